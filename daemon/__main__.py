"""Run the daemon: ``python -m daemon`` or ``ksi-daemon``."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from ksi_worker.logs import configure_logging
from ksi_worker.settings import Settings, SettingsError

if TYPE_CHECKING:
    from ksi_worker.store import TaskStore

    from .commands import Commands

logger = logging.getLogger("daemon")


def main() -> int:
    configure_logging()
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        logger.error("Invalid setting: %s", error)
        return 2

    # Imported here so a settings error is reported before the broker starts.
    from ksi_worker.actors import execute_claude_task
    from ksi_worker.broker import redis_client
    from ksi_worker.store import TaskStore

    from .commands import Commands

    # Few retries: a client should hear at once that Redis is down.
    store = TaskStore(
        redis_client(settings, retries=2), events_maxlen=settings.events_maxlen
    )
    commands = Commands(settings, store, execute_claude_task.send)
    try:
        asyncio.run(serve(settings, store, commands))
    except ValueError as error:
        logger.error("Daemon cannot start: %s", error)
        return 2
    logger.info("Daemon stopped.")
    return 0


async def serve(settings: Settings, store: TaskStore, commands: Commands) -> None:
    """Serve the commands and the event bus until SIGTERM or SIGINT."""
    import redis.asyncio

    from .event_commands import EventCommands
    from .events import EventBus
    from .server import DaemonServer

    bus = EventBus(redis.asyncio.Redis.from_url(settings.redis_url))
    events = EventCommands(bus, store)
    commands.table["PUBLISH"] = events.publish
    commands.table["EVENTS_INFO"] = events.events_info
    server = DaemonServer(
        commands,
        settings.daemon_socket,
        streams={"SUBSCRIBE": events.subscribe},
        socket_group=settings.socket_group,
    )
    bus.start()
    try:
        await server.serve_until_signalled()
    finally:
        await bus.stop(
            "the daemon is stopping; reconnect with since set to the id of the "
            "last event received"
        )


if __name__ == "__main__":
    sys.exit(main())
