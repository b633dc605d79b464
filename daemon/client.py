"""A blocking client of the daemon protocol, used by ``ksi`` and the tests."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from typing import Any


class DaemonUnavailable(Exception):
    """The daemon's socket is missing or refuses connections."""


class CommandError(Exception):
    """The daemon answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonClient:
    """One connection to the daemon; requests are sent one at a time.

    Parameters:
      socket_path: Path of the daemon's Unix socket.
      timeout_s: Seconds to wait for a reply.
    """

    def __init__(self, socket_path: Path, *, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            self.sock.close()
            raise DaemonUnavailable(
                f"cannot connect to the daemon at {socket_path}: {error.strerror}"
            ) from None
        self.reader = self.sock.makefile("rb")
        self.ids = itertools.count(1)

    def request(self, command: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; raise CommandError on error."""
        request_id = next(self.ids)
        line = json.dumps({"id": request_id, "command": command, "params": params})
        self.sock.sendall(line.encode() + b"\n")
        reply = self.read_reply()
        if reply.get("status") != "ok":
            error = reply.get("error") or {}
            raise CommandError(error.get("code", "ERROR"), error.get("message", ""))
        return reply["result"]

    def read_reply(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise DaemonUnavailable("the daemon closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
