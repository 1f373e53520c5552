"""Quiet, plain-text logs: known harmless warnings filtered once, semiseg_d2's own log lines in log.txt, no ANSI.

:func:`filter_known_warnings` runs when ``semiseg_d2`` is imported (before detectron2 is, if the package is imported
first, as every tool does). :func:`setup_run_logging` runs just before detectron2's ``default_setup``
(engine/cli.py, tools/run_demo.py): it adds the ``semiseg_d2`` logger to the console and OUTPUT_DIR/log.txt and makes
log files plain text.
"""
import logging
import re
import warnings

__all__ = ["filter_known_warnings", "setup_run_logging", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The environment table of detectron2's default_setup: the sal-detectron2 wheel ships no compiled ops. Nothing in
# semiseg_d2 uses them (projects/SemiInstance evaluates with pycocotools' COCOeval for that reason).
_C_NOT_BUILT = re.compile(r"(detectron2\._C\s+)not built correctly: No module named 'detectron2\._C'")
_C_NOTE = r"\1not built (not needed: semiseg_d2 uses no compiled detectron2 op)"


def strip_ansi(text: str) -> str:
    """``text`` without ANSI terminal escape sequences (colours)."""
    return _ANSI.sub("", text)


def filter_known_warnings() -> None:
    """Silence warnings that say nothing to a semiseg_d2 user, once per process (idempotent):

    - ``torch.jit.script is deprecated`` (FutureWarning): detectron2 and fvcore script a few helpers at import time;
      semiseg_d2 scripts nothing;
    - ``No CUDA runtime is found, using CUDA_HOME=...``: torch's C++-extension module, imported by detectron2's
      environment report; a CPU machine is told it has no GPU by ``MODEL.DEVICE`` checks, where it matters.
    """
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class _EnvironmentNote(logging.Filter):
    """Rewrites detectron2's "_C not built correctly" row of the environment table into what it means here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "detectron2._C" in record.msg:
            record.msg = _C_NOT_BUILT.sub(_C_NOTE, record.msg)
        return True


class _PlainFormatter(logging.Formatter):
    """The wrapped formatter's text without ANSI colours (detectron2 highlights the config dump with pygments)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(self.inner.format(record))


def _is_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return bool(getattr(stream, "isatty", lambda: False)())


def setup_run_logging(output_dir: str, rank: int = 0) -> None:
    """Set up the detectron2, fvcore and ``semiseg_d2`` loggers (console on rank 0, ``output_dir``/log.txt) so that
    whatever is not a terminal (log.txt, a redirected console) gets plain text, and the environment table's ``_C`` row
    says what it means. Call BEFORE detectron2's ``default_setup``: it calls ``setup_logger`` with the same
    arguments, gets these (cached) loggers back and logs its environment table and config dump through them."""
    from detectron2.utils.logger import setup_logger

    setup_logger(output_dir, distributed_rank=rank, name="fvcore")  # exactly default_setup's calls (lru_cache)
    setup_logger(output_dir, distributed_rank=rank)
    setup_logger(output_dir, distributed_rank=rank, name="semiseg_d2", abbrev_name="semiseg")
    d2 = logging.getLogger("detectron2")
    if not any(isinstance(f, _EnvironmentNote) for f in d2.filters):
        d2.addFilter(_EnvironmentNote())
    for name in ("detectron2", "fvcore", "semiseg_d2"):
        for handler in logging.getLogger(name).handlers:
            if not _is_terminal(handler) and not isinstance(handler.formatter, _PlainFormatter):
                handler.setFormatter(_PlainFormatter(handler.formatter or logging.Formatter()))
