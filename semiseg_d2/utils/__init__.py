"""Development utilities: per-component step profiling (profiling.py), used by tools/benchmark.py."""
