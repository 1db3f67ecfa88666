"""Logging set-up for the apps and the CLI (library modules only call ``getLogger``)."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``fl_imaging`` log records to stdout once per process (idempotent)."""
    root = logging.getLogger("fl_imaging")
    if not any(getattr(h, "_fl_imaging", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._fl_imaging = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)
