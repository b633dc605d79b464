"""A blocking client of the daemon protocol, used by ``ksi`` and the tests."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DaemonUnavailable(Exception):
    """The daemon's socket is missing or refuses connections."""


class CommandError(Exception):
    """The daemon replied to a request with an error."""

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
        # Raw UTF-8, not \u escapes, so a prompt's size on the wire stays close
        # to its size in bytes.
        line = json.dumps(
            {"id": request_id, "command": command, "params": params},
            ensure_ascii=False,
        )
        try:
            self.sock.sendall(line.encode("utf-8", errors="surrogatepass") + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may close a connection whose line is too long before
            # reading all of it; its error reply, if any, gives the reason.
            pass
        reply = self.read_reply()
        if reply.get("status") != "ok":
            error = reply.get("error") or {}
            raise CommandError(error.get("code", "ERROR"), error.get("message", ""))
        return reply["result"]

    def subscribe(
        self,
        *,
        event_types: list[str] | None = None,
        task_id: str | None = None,
        since: str | None = None,
    ) -> dict[str, Any]:
        """Send SUBSCRIBE and return its acknowledgement; then call events().

        After this the connection carries only the subscription's events.
        """
        params = {"event_types": event_types, "task_id": task_id, "since": since}
        return self.request(
            "SUBSCRIBE", **{name: value for name, value in params.items() if value}
        )

    def events(self) -> Iterator[dict[str, Any]]:
        """Yield the events of a subscription as they arrive.

        Raises CommandError when the daemon ends the subscription with a
        reason (``SLOW_SUBSCRIBER``, ``SHUTTING_DOWN``), DaemonUnavailable when
        the connection closes, and TimeoutError after the socket's timeout.
        """
        while True:
            reply = self.read_reply()
            event = reply.get("event")
            if isinstance(event, dict):
                yield event
                continue
            error = reply.get("error") or {}
            raise CommandError(error.get("code", "ERROR"), error.get("message", ""))

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
