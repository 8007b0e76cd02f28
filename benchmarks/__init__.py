"""Benchmarks of replistate, each figure a ratio to a raw baseline of the same run.

Run ``python -m benchmarks`` (``--quick`` for a short run, ``--json`` for one
closing line of JSON); see docs/benchmarks.md for the figures and how to read them.
"""
