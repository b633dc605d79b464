"""Hostile input to the daemon: fuzzed lines, floods of idle connections and
clients that vanish mid-reply. The daemon must answer or close, never crash,
keep its memory bounded, and keep serving everyone else."""

from __future__ import annotations

import json
import resource
import socket
import string
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.client import DaemonClient
from daemon.protocol import MAX_LINE_BYTES
from tests.conftest import DaemonProcess, start_daemon, stop_daemon

pytestmark = pytest.mark.timeout(300)

COMMANDS = [
    "QUEUE_TASK",
    "TASK_STATUS",
    "LIST_TASKS",
    "CANCEL_TASK",
    "RETRY_TASK",
    "HEALTH_CHECK",
    "PUBLISH",
    "LIST_DEAD_LETTERS",
    "NOT_A_COMMAND",
]

#: Connections held open at once by the idle-connection test.
IDLE_CONNECTIONS = 2000

#: Daemon memory the tests accept after the floods, in bytes.
MAX_DAEMON_RSS = 300 * 1024 * 1024


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 8192)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture(scope="module")
def fuzz_daemon(redis_server_module) -> Iterator[DaemonProcess]:
    _raise_fd_limit()
    started = start_daemon(redis_server_module, preexec_fn=_raise_fd_limit)
    yield started
    stop_daemon(started)


@pytest.fixture(scope="module")
def peak_rss(fuzz_daemon) -> Iterator[list[int]]:
    """Sample the daemon's RSS every 50 ms for the whole module."""
    samples: list[int] = []
    stopping = threading.Event()
    process = psutil.Process(fuzz_daemon.process.pid)

    def sample() -> None:
        while not stopping.wait(0.05):
            try:
                samples.append(process.memory_info().rss)
            except psutil.Error:
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield samples
    stopping.set()
    thread.join()
    print(f"\ndaemon peak RSS: {max(samples, default=0) / 2**20:.1f} MiB")


class Line:
    """One connection that sends a line and reads one reply line."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def ask(self, payload: bytes) -> dict:
        self.sock.sendall(payload + b"\n")
        reply = self.reader.readline()
        assert reply, f"connection closed after {payload[:80]!r}"
        return json.loads(reply)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _assert_alive(daemon: DaemonProcess) -> None:
    assert daemon.process.poll() is None, daemon.log.read_text()[-3000:]
    with DaemonClient(daemon.socket, timeout_s=10) as client:
        assert client.request("HEALTH_CHECK")["redis"]["ok"] is True


def _assert_reply_shape(reply: dict) -> None:
    assert reply["status"] in {"ok", "error"}
    if reply["status"] == "error":
        assert reply["error"]["code"] != "INTERNAL", reply
        assert reply["error"]["message"]


tried = {"bytes": 0, "json": 0}


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=2000).filter(lambda b: b"\n" not in b and b.strip()))
def test_random_bytes_get_a_reply(fuzz_daemon, peak_rss, payload):
    tried["bytes"] += 1
    line = Line(fuzz_daemon.socket)
    try:
        _assert_reply_shape(line.ask(payload))
        # The same connection still serves a valid request.
        assert line.ask(b'{"command": "HEALTH_CHECK"}')["status"] == "ok"
    finally:
        line.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(string.printable, max_size=50),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=15), children, max_size=5)
    ),
    max_leaves=20,
)

param_names = st.sampled_from(
    [
        "prompt",
        "task_id",
        "model",
        "timeout_s",
        "allowed_tools",
        "session_id",
        "status",
        "limit",
        "event_type",
        "payload",
        "from_agent",
        "max_retries",
        "idempotency_key",
        "retry_on_timeout",
        "unknown",
    ]
)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    command=st.sampled_from(COMMANDS) | st.text(max_size=20),
    params=st.dictionaries(param_names, json_values, max_size=6) | json_values,
    request_id=json_values,
)
def test_random_requests_never_fail_internally(
    fuzz_daemon, peak_rss, command, params, request_id
):
    tried["json"] += 1
    request = {"id": request_id, "command": command, "params": params}
    payload = json.dumps(request, allow_nan=True).encode()
    line = Line(fuzz_daemon.socket)
    try:
        reply = line.ask(payload)
        _assert_reply_shape(reply)
    finally:
        line.close()


def test_fuzzing_left_daemon_serving(fuzz_daemon, peak_rss):
    _assert_alive(fuzz_daemon)
    print(f"\nfuzzed inputs: {tried['bytes']} byte lines, {tried['json']} requests")


def test_half_lines_and_disconnects(fuzz_daemon, peak_rss):
    for _ in range(200):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(fuzz_daemon.socket))
            sock.sendall(b'{"command": "HEALTH_CH')
    for _ in range(200):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(fuzz_daemon.socket))
            sock.sendall(b'{"command": "LIST_TASKS", "params": {"limit": 1000}}\n')
    _assert_alive(fuzz_daemon)


def test_idle_connections_do_not_block_others(fuzz_daemon, peak_rss):
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(fuzz_daemon.socket))
            sock.sendall(b'{"comm')
            idle.append(sock)
        started = time.monotonic()
        with DaemonClient(fuzz_daemon.socket, timeout_s=10) as client:
            for _ in range(20):
                client.request("HEALTH_CHECK")
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"20 health checks took {elapsed:.1f} s"
    finally:
        for sock in idle:
            sock.close()
    _assert_alive(fuzz_daemon)


def test_oversized_lines_close_only_their_connection(fuzz_daemon, peak_rss):
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(fuzz_daemon.socket))
            try:
                sock.sendall(b"A" * (MAX_LINE_BYTES + 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass
    _assert_alive(fuzz_daemon)


def test_daemon_memory_stays_bounded(fuzz_daemon, peak_rss):
    rss = psutil.Process(fuzz_daemon.process.pid).memory_info().rss
    assert rss < MAX_DAEMON_RSS
    assert max(peak_rss, default=0) < MAX_DAEMON_RSS


def test_queue_limit_rejects_with_clear_error(redis_server):
    daemon = start_daemon(redis_server, KSI_MAX_QUEUED="3")
    try:
        with DaemonClient(daemon.socket) as client:
            for n in range(3):
                client.request("QUEUE_TASK", prompt=f"task {n}")
            line = Line(daemon.socket)
            reply = line.ask(
                json.dumps(
                    {"command": "QUEUE_TASK", "params": {"prompt": "x"}}
                ).encode()
            )
            line.close()
    finally:
        stop_daemon(daemon)
    assert reply["error"]["code"] == "QUEUE_FULL"
    assert "KSI_MAX_QUEUED is 3" in reply["error"]["message"]
