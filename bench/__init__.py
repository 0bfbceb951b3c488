"""Benchmark scripts, run from the repository root as ``python -m bench.NAME`` (``make bench``).

They import the installed packages (``metamorph``, ``train``, ``decode``); ``configs`` and
``tests`` come from the repository root, as for ``python -m train``.
"""
