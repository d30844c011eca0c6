"""Benchmark and drill scripts, each run as `python benchmarks/NAME.py` (see README.md here).

A package only so that the tests can import them (`from benchmarks import e2e`).
"""
