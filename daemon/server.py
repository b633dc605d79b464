"""The asyncio Unix-socket server of the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import redis

from .commands import Commands
from .protocol import (
    MAX_LINE_BYTES,
    ProtocolError,
    error_reply,
    ok_reply,
    parse_request,
)

logger = logging.getLogger(__name__)


class DaemonServer:
    """Serves the command table on a Unix socket, one request per line.

    Parameters:
      commands: The command handlers.
      socket_path: Path of the Unix socket, created with mode 0600.
    """

    def __init__(self, commands: Commands, socket_path: Path) -> None:
        self.commands = commands
        self.socket_path = socket_path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # Create the socket with no access for others from the first moment.
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self.handle_connection, path=str(self.socket_path), limit=MAX_LINE_BYTES
            )
        finally:
            os.umask(old_umask)
        logger.info("Daemon listening on %s (pid %d).", self.socket_path, os.getpid())

    async def serve_until_signalled(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("Daemon stopping.")
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.commands.connections += 1
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    writer.write(
                        error_reply(
                            None,
                            "LINE_TOO_LONG",
                            f"request line is longer than {MAX_LINE_BYTES} bytes; "
                            "the connection is closed",
                        )
                    )
                    await writer.drain()
                    break
                if not line.strip():
                    continue
                writer.write(await self.dispatch(line))
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            self.commands.connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await writer.wait_closed()

    async def dispatch(self, line: bytes) -> bytes:
        request_id = None
        try:
            request_id, command, params = parse_request(line)
            handler = self.commands.table.get(command)
            if handler is None:
                raise ProtocolError(
                    "UNKNOWN_COMMAND",
                    f"unknown command {command[:64]!r}; known commands: "
                    f"{', '.join(sorted(self.commands.table))}",
                )
            return ok_reply(request_id, await handler(params))
        except ProtocolError as error:
            return error_reply(request_id, error.code, error.message)
        except redis.RedisError as error:
            logger.error("Request %r failed: Redis error: %s", request_id, error)
            return error_reply(
                request_id,
                "UNAVAILABLE",
                f"Redis is unavailable ({error}); check `ksi-supervisorctl status "
                "ksi:redis` and retry",
            )
        except Exception as error:
            logger.exception("Request %r failed: %s", request_id, error)
            return error_reply(
                request_id, "INTERNAL", f"{type(error).__name__}: {error}"
            )
