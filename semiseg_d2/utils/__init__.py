"""Utilities: named scopes of the training step and their timer (profiling.py, used by tools/benchmark.py); quiet,
plain-text logs (run_logging.py: known harmless warnings filtered at import, semiseg_d2's loggers set up with detectron2's)."""
