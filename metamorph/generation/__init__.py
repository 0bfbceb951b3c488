"""Batched, KV-cached, jitted decoding of interleaved text and visual tokens.

``engine`` (``Engine``: the jitted decode loop), ``sampling`` (how a text token is chosen and
a visual token guided), ``prompts`` (tokenized prompts, left padding, the shape buckets).
"""
