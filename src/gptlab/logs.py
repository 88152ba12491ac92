"""gptlab's one logger: library code logs, and each record is one line on stderr.

Library code never prints; it calls ``log = get_logger(__name__)`` and
``log.warning(...)`` / ``log.info(...)``. Unless the application configured
the ``gptlab`` logger itself (added a handler), every record appears as one
line, ``warning: ...`` or ``note: ...``, on the *current* ``sys.stderr`` (so
pytest's capture and the CLI's redirections see it).
"""

from __future__ import annotations

import logging
import sys


class _StderrLines(logging.Handler):
    """One ``warning: ...`` / ``note: ...`` line per record on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "note"
        sys.stderr.write(f"{level}: {record.getMessage()}\n")


_ROOT = logging.getLogger("gptlab")
if not _ROOT.handlers:
    _ROOT.addHandler(_StderrLines())
    _ROOT.setLevel(logging.INFO)
    _ROOT.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (``gptlab.x.y``), a child of the configured ``gptlab`` logger."""
    return logging.getLogger(name if name.startswith("gptlab") else f"gptlab.{name}")
