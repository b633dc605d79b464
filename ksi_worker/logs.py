"""Logging setup shared by every program of the bundle."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure_logging() -> None:
    """Log to stderr, which supervisord writes to the program's log file.

    ``KSI_LOG_LEVEL`` sets the level (default INFO).
    """
    level = os.environ.get("KSI_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    else:
        root.setLevel(level)
