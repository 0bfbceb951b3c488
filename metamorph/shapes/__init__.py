"""The shapes world: a procedural world of coloured shapes with an exact grader.

The whole pipeline trains on it on a CPU in minutes, and both understanding and generation
are graded by exact checks. Held-out (colour, shape) pairs measure whether generation
generalises from understanding data. ``python -m metamorph.shapes --out DIR`` writes one.

  scene      the vocabulary, ``Shape``, placement, geometry, rendering, sampling, held-out pairs
  phrases    phrase tables, paraphrase templates, facts: every word a record can hold
  tasks      the task generators, one per task kind of the method
  mix        the task mix: which task kinds a world's records are drawn from, how often
  examples   one example: a conversation record and its rendered images
  prompts    the text-to-image evaluation prompts
  knowledge  the world-knowledge probes: prompts naming attributes only through knowledge or other words
  world      writing a world: splits, images, prompts, tokenizer, the TFDS copy, world.json
  tokenizer  the world's word-level tokenizer
  oracle     the rule-based reader of the world's images (the grader)

It imports only the generic data layer (``metamorph.data``) and ``metamorph.tokens``.
"""
