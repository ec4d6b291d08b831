"""capplug's benchmarks, each run from the repository root as ``python -m benchmarks.NAME``.

Every script measures its baseline in the same run and writes JSON, a table and (where it helps)
a plot into ``benchmarks/results/``; ``docs/benchmarks.md`` says how each figure is measured.
Scripts use capplug's public API only.
"""
