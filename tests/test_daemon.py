"""The daemon over its Unix socket, with a real Redis and no workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from daemon.client import CommandError, DaemonClient
from daemon.protocol import MAX_LINE_BYTES, MAX_PROMPT_BYTES
from ksi_worker import keys
from ksi_worker.lifecycle import EventType, TaskStatus
from ksi_worker.queues import queue_depth
from ksi_worker.store import TaskStore
from tests.conftest import start_daemon, stop_daemon


@pytest.fixture
def daemon(redis_server) -> Iterator[Path]:
    """Run ``python -m daemon`` on a private Redis; yield its socket path."""
    started = start_daemon(redis_server)
    yield started.socket
    stop_daemon(started)


def _raw(sock_path: Path, payload: bytes) -> list[dict]:
    """Send raw bytes, then read one reply line per request line."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        sock.sendall(payload)
        reader = sock.makefile("rb")
        return [json.loads(reader.readline()) for _ in payload.splitlines()]


def test_queue_task_returns_id_and_queued(daemon, redis_server):
    with DaemonClient(daemon) as client:
        reply = client.request("QUEUE_TASK", prompt="hello")
    assert reply["status"] == "queued"
    assert len(reply["task_id"]) == 32
    depth = queue_depth(redis.Redis.from_url(redis_server), "claude")
    assert depth["ready"] == 1


def test_task_status_hides_prompt(daemon):
    with DaemonClient(daemon) as client:
        task_id = client.request("QUEUE_TASK", prompt="secret words")["task_id"]
        record = client.request("TASK_STATUS", task_id=task_id)
    assert record["status"] == "queued"
    assert record["attempt"] == 0
    assert "prompt" not in record
    assert "secret words" not in json.dumps(record)


def test_queue_task_emits_queued_event(daemon, redis_server):
    with DaemonClient(daemon) as client:
        task_id = client.request("QUEUE_TASK", prompt="hello")["task_id"]
    entries = redis.Redis.from_url(redis_server).xrange(keys.EVENT_STREAM)
    fields = entries[-1][1]
    assert fields[b"event_type"] == b"TASK_QUEUED"
    assert fields[b"task_id"] == task_id.encode()


def test_bad_requests_get_errors_and_connection_stays_open(daemon):
    lines = [
        b"{broken",
        b'{"command": "NOPE"}',
        b'{"command": "QUEUE_TASK", "params": {"prompt": 3}}',
        b'{"command": "QUEUE_TASK", "params": {"prompt": "x", "timeout_s": -1}}',
        b'{"id": "last", "command": "HEALTH_CHECK"}',
    ]
    replies = _raw(daemon, b"\n".join(lines) + b"\n")
    codes = [reply.get("error", {}).get("code") for reply in replies]
    assert codes == [
        "INVALID_JSON",
        "UNKNOWN_COMMAND",
        "INVALID_PARAMS",
        "INVALID_PARAMS",
        None,
    ]
    assert "prompt" in replies[2]["error"]["message"]
    assert "timeout_s" in replies[3]["error"]["message"]
    assert replies[4]["id"] == "last"
    assert replies[4]["status"] == "ok"


def test_unknown_task_is_not_found(daemon):
    with DaemonClient(daemon) as client, pytest.raises(CommandError) as info:
        client.request("TASK_STATUS", task_id="nope")
    assert info.value.code == "NOT_FOUND"


def test_cancel_queued_task(daemon):
    with DaemonClient(daemon) as client:
        task_id = client.request("QUEUE_TASK", prompt="hello")["task_id"]
        reply = client.request("CANCEL_TASK", task_id=task_id)
        record = client.request("TASK_STATUS", task_id=task_id)
        with pytest.raises(CommandError) as again:
            client.request("CANCEL_TASK", task_id=task_id)
    assert reply["status"] == "cancelled"
    assert record["status"] == "cancelled"
    assert again.value.code == "ALREADY_ENDED"
    assert "cancelled" in again.value.message


def test_list_tasks_newest_first_with_filter(daemon):
    with DaemonClient(daemon) as client:
        first = client.request("QUEUE_TASK", prompt="one")["task_id"]
        second = client.request("QUEUE_TASK", prompt="two")["task_id"]
        client.request("CANCEL_TASK", task_id=first)
        listed = client.request("LIST_TASKS")["tasks"]
        cancelled = client.request("LIST_TASKS", status="cancelled")["tasks"]
    assert [t["task_id"] for t in listed[:2]] == [second, first]
    assert [t["task_id"] for t in cancelled] == [first]


def test_health_reports_no_workers(daemon):
    with DaemonClient(daemon) as client:
        report = client.request("HEALTH_CHECK")
    assert report["redis"]["ok"] is True
    assert report["live_workers"] == 0
    assert report["status"] == "degraded"
    assert report["queues"]["claude"] == {"ready": 0, "delayed": 0, "dead": 0}


def test_health_reports_redis_down(daemon, redis_server):
    redis.Redis.from_url(redis_server).shutdown(nosave=True)
    with DaemonClient(daemon) as client:
        report = client.request("HEALTH_CHECK")
        with pytest.raises(CommandError) as info:
            client.request("QUEUE_TASK", prompt="x")
    assert report["status"] == "unavailable"
    assert report["redis"]["ok"] is False
    assert info.value.code == "UNAVAILABLE"


def test_overlong_line_gets_error_then_close(daemon):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon))
        try:
            sock.sendall(b"x" * (MAX_LINE_BYTES + 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["error"]["code"] == "LINE_TOO_LONG"
    with DaemonClient(daemon) as client:
        assert client.request("HEALTH_CHECK")["redis"]["ok"] is True


def test_socket_mode_is_owner_only(daemon):
    assert daemon.stat().st_mode & 0o777 == 0o600


def test_transition_requires_fields_to_match(redis_server):
    store = TaskStore(redis.Redis.from_url(redis_server))
    store.create("t-require", {"prompt": "x"})
    store.transition(
        "t-require",
        allowed_from=(TaskStatus.QUEUED,),
        fields={"status": "running", "worker_id": "host:1"},
        event_type=EventType.TASK_STARTED,
        new_attempt=True,
    )
    stale, _, _ = store.transition(
        "t-require",
        allowed_from=(TaskStatus.RUNNING,),
        fields={"status": "retrying"},
        event_type=EventType.TASK_RETRYING,
        require={"attempt": 1, "worker_id": "host:2"},
    )
    current, _, attempt = store.transition(
        "t-require",
        allowed_from=(TaskStatus.RUNNING,),
        fields={"status": "retrying"},
        event_type=EventType.TASK_RETRYING,
        require={"attempt": 1, "worker_id": "host:1"},
    )
    assert stale is False
    assert current is True
    assert attempt == 1
    assert store.get("t-require")["status"] == "retrying"


def test_multibyte_prompt_near_limit_is_accepted(daemon):
    prompt = "\N{GRINNING FACE}" * (MAX_PROMPT_BYTES // 4 - 10)
    with DaemonClient(daemon) as client:
        reply = client.request("QUEUE_TASK", prompt=prompt)
    assert reply["status"] == "queued"


def test_cli_rejects_oversized_prompt_with_limit(daemon):
    env = {**os.environ, "KSI_HOME": str(daemon.parent.parent)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ksi"), "submit", "-"],
        input="x" * (MAX_PROMPT_BYTES + 1),
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 6
    assert str(MAX_PROMPT_BYTES) in done.stderr
