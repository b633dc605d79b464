"""Run the daemon: ``python -m daemon`` or ``ksi-daemon``."""

from __future__ import annotations

import asyncio
import logging
import sys

from ksi_worker.logs import configure_logging
from ksi_worker.settings import Settings, SettingsError

logger = logging.getLogger("daemon")


def main() -> int:
    configure_logging()
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        logger.error("Invalid setting: %s", error)
        return 2

    # Imported here so a settings error is reported before the broker starts.
    from ksi_worker.actors import execute_claude_task, store

    from .commands import Commands
    from .server import DaemonServer

    commands = Commands(settings, store, execute_claude_task.send)
    server = DaemonServer(commands, settings.daemon_socket)
    asyncio.run(server.serve_until_signalled())
    logger.info("Daemon stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
