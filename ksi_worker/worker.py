"""Run Dramatiq's command line with the bundle's logging.

``python -m ksi_worker.worker ksi_worker.actors --processes 1 ...`` takes the
arguments of ``python -m dramatiq``. Dramatiq's parent process would otherwise
log in its own text format, whatever the value of ``KSI_LOG_FORMAT``. With the
root logger set up first, its ``logging.basicConfig`` calls change nothing, and
its worker processes inherit the handler through fork.
"""

from __future__ import annotations

import sys

from dramatiq.cli import main as dramatiq_main

from .logs import configure_logging


def main() -> int:
    configure_logging()
    return dramatiq_main()


if __name__ == "__main__":
    sys.exit(main())
