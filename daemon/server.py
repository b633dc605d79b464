"""The asyncio Unix-socket server of the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import redis

from .commands import Commands
from .metrics import CONNECTIONS, OK, count_command
from .protocol import (
    MAX_LINE_BYTES,
    ProtocolError,
    error_reply,
    ok_reply,
    parse_request,
)
from .recovery import WorkerLossSweeper

logger = logging.getLogger(__name__)

#: A command that takes over its connection: it gets the request id, the
#: params, and the connection's reader and writer, and returns when the
#: connection must close. A ProtocolError it raises is sent as an error reply
#: and the connection stays usable.
StreamHandler = Callable[
    [Any, dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter],
    Awaitable[None],
]


def share_with_group(socket_path: Path, group: str) -> None:
    """Give ``group`` access to the socket (0660) and its folder (0710).

    Raises ValueError naming the group when the host has no such group.
    """
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(
            f"KSI_SOCKET_GROUP={group!r} is not a group on this host; create it "
            "or unset KSI_SOCKET_GROUP"
        ) from None
    os.chown(socket_path.parent, -1, gid)
    os.chmod(socket_path.parent, 0o710)
    os.chown(socket_path, -1, gid)
    os.chmod(socket_path, 0o660)


#: Connections the kernel queues before the daemon accepts them (Linux caps
#: it at net.core.somaxconn). A burst of clients past it waits to connect.
LISTEN_BACKLOG = 1024


class DaemonServer:
    """Serves the command table on a Unix socket, one request per line.

    Parameters:
      commands: The command handlers.
      socket_path: Path of the Unix socket, created with mode 0600.
      socket_group: Group that may use the socket too (mode 0660), or None.
      streams: Commands that turn their connection into a stream, such as
        SUBSCRIBE.
    """

    def __init__(
        self,
        commands: Commands,
        socket_path: Path,
        *,
        streams: Mapping[str, StreamHandler] | None = None,
        socket_group: str | None = None,
    ) -> None:
        self.commands = commands
        self.socket_path = socket_path
        self.streams = dict(streams or {})
        self.socket_group = socket_group
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A pid reused from an exited daemon must not inherit its gauge value.
        CONNECTIONS.set(0)
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # Create the socket with no access for others from the first moment.
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self.handle_connection,
                path=str(self.socket_path),
                limit=MAX_LINE_BYTES,
                backlog=LISTEN_BACKLOG,
            )
        finally:
            os.umask(old_umask)
        if self.socket_group:
            share_with_group(self.socket_path, self.socket_group)
        logger.info("Daemon listening on %s (pid %d).", self.socket_path, os.getpid())

    async def serve_until_signalled(self) -> None:
        await self.start()
        sweeper = asyncio.create_task(
            WorkerLossSweeper(self.commands.store).run_forever(), name="worker-loss"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("Daemon stopping.")
        sweeper.cancel()
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.commands.connections += 1
        CONNECTIONS.inc()
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
                stream = self._stream_request(line)
                if stream is not None:
                    if await self.serve_stream(*stream, reader, writer):
                        break
                    continue
                writer.write(await self.dispatch(line))
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            self.commands.connections -= 1
            CONNECTIONS.dec()
            writer.close()
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await writer.wait_closed()

    def _stream_request(
        self, line: bytes
    ) -> tuple[Any, StreamHandler, dict[str, Any]] | None:
        try:
            request_id, command, params = parse_request(line)
        except ProtocolError:
            return None  # dispatch sends the error reply
        handler = self.streams.get(command)
        return None if handler is None else (request_id, handler, params)

    async def serve_stream(
        self,
        request_id: Any,
        handler: StreamHandler,
        params: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Run a stream command; return whether its connection must close."""
        try:
            await handler(request_id, params, reader, writer)
            return True
        except ProtocolError as error:
            writer.write(error_reply(request_id, error.code, error.message))
        except redis.RedisError as error:
            logger.error("Request %r failed: Redis error: %s", request_id, error)
            writer.write(
                error_reply(
                    request_id,
                    "UNAVAILABLE",
                    f"Redis is unavailable ({error}); check `ksi-supervisorctl "
                    "status ksi:redis` and retry",
                )
            )
        except Exception as error:
            logger.exception("Request %r failed: %s", request_id, error)
            writer.write(
                error_reply(request_id, "INTERNAL", f"{type(error).__name__}: {error}")
            )
            return True
        await writer.drain()
        return False

    async def dispatch(self, line: bytes) -> bytes:
        request_id = None
        command = None
        result = "INTERNAL"
        try:
            request_id, command, params = parse_request(line)
            handler = self.commands.table.get(command)
            if handler is None:
                raise ProtocolError(
                    "UNKNOWN_COMMAND",
                    f"unknown command {command[:64]!r}; known commands: "
                    f"{', '.join(sorted({*self.commands.table, *self.streams}))}",
                )
            reply = ok_reply(request_id, await handler(params))
            result = OK
            return reply
        except ProtocolError as error:
            result = error.code
            return error_reply(request_id, error.code, error.message)
        except redis.RedisError as error:
            result = "UNAVAILABLE"
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
        finally:
            count_command(command, self.commands.table, result)
