"""Waiting for a task from the client side, against a daemon without SUBSCRIBE."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.follow import wait_for_task


class OldDaemon:
    """A Unix-socket server that supports only TASK_STATUS, like older daemons.

    The task it reports is running for ``running_polls`` requests, then
    succeeded.
    """

    def __init__(self, path: Path, running_polls: int) -> None:
        self.path = path
        self.running_polls = running_polls
        self.commands: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    stream.write(self._reply(json.loads(line)) + b"\n")
                    stream.flush()

    def _reply(self, request: dict) -> bytes:
        command = request["command"]
        self.commands.append(command)
        if command != "TASK_STATUS":
            error = {"code": "UNKNOWN_COMMAND", "message": f"unknown {command}"}
            reply = {"id": request.get("id"), "status": "error", "error": error}
        else:
            polls = self.commands.count("TASK_STATUS")
            status = "running" if polls <= self.running_polls else "succeeded"
            result = {"task_id": request["params"]["task_id"], "status": status}
            reply = {"id": request.get("id"), "status": "ok", "result": result}
        return json.dumps(reply).encode()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def old_daemon() -> Iterator[OldDaemon]:
    folder = Path(tempfile.mkdtemp(prefix="ksi-old-", dir="/tmp"))
    server = OldDaemon(folder / "ksi.sock", running_polls=3)
    yield server
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def stuck_daemon() -> Iterator[OldDaemon]:
    folder = Path(tempfile.mkdtemp(prefix="ksi-old-", dir="/tmp"))
    server = OldDaemon(folder / "ksi.sock", running_polls=10_000)
    yield server
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_wait_polls_when_subscribe_is_unknown(old_daemon):
    record = wait_for_task(old_daemon.path, "t1", timeout_s=30)
    assert record == {"task_id": "t1", "status": "succeeded"}
    assert old_daemon.commands[0] == "SUBSCRIBE"
    assert old_daemon.commands[1:] == ["TASK_STATUS"] * 4


def test_wait_polling_times_out(stuck_daemon):
    with pytest.raises(TimeoutError):
        wait_for_task(stuck_daemon.path, "t1", timeout_s=1.2)
