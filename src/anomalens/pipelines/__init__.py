"""Pipelines over many runs: benchmark grids (benchmark.py) and hyper-parameter search (hpo.py).

Nothing heavy is imported here; each module imports its optional dependencies where used.
"""
