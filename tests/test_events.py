"""The event bus: SUBSCRIBE and PUBLISH over the daemon's socket.

The first tests run the daemon alone on a private Redis; the last ones run a
whole bundle under supervisord with the real CLI against the stand-in API.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from daemon.client import CommandError, DaemonClient
from daemon.event_commands import MAX_PAYLOAD_BYTES
from daemon.events import SUBSCRIBER_QUEUE_EVENTS
from ksi_worker import keys
from ksi_worker.proctree import find_task_processes
from tests.bundle import BIN
from tests.conftest import DaemonProcess, start_bundle, start_daemon, stop_daemon

pytestmark = pytest.mark.timeout(300)

LIFECYCLE = ["TASK_QUEUED", "TASK_STARTED", "TASK_PROGRESS", "TASK_COMPLETED"]


@pytest.fixture
def daemon(redis_server) -> Iterator[DaemonProcess]:
    """Run ``python -m daemon`` on a private Redis, with no workers."""
    started = start_daemon(redis_server)
    yield started
    stop_daemon(started)


def _subscribe(sock: Path, **params) -> tuple[DaemonClient, dict]:
    """Subscribe, retrying while the daemon's bus has not read the stream yet."""
    deadline = time.monotonic() + 10
    while True:
        client = DaemonClient(sock)
        try:
            return client, client.subscribe(**params)
        except CommandError as error:
            client.close()
            if error.code != "UNAVAILABLE" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _publish_many(sock: Path, count: int, *, payload: dict | None = None) -> list:
    """PUBLISH ``count`` NOTE events on one pipelined connection; return ids."""
    payload = payload or {}
    ids = []
    with DaemonClient(sock) as client:
        for start in range(0, count, 500):
            batch = range(start, min(count, start + 500))
            lines = b"".join(
                json.dumps(
                    {
                        "command": "PUBLISH",
                        "params": {
                            "from_agent": "bench",
                            "event_type": "NOTE",
                            "payload": {**payload, "n": n},
                        },
                    }
                ).encode()
                + b"\n"
                for n in batch
            )
            client.sock.sendall(lines)
            for _ in batch:
                reply = client.read_reply()
                assert reply["status"] == "ok", reply
                ids.append(reply["result"]["id"])
    return ids


def test_published_event_reaches_subscriber(daemon):
    subscriber, ack = _subscribe(daemon.socket)
    with subscriber, DaemonClient(daemon.socket) as client:
        assert ack["subscribed"] is True
        reply = client.request(
            "PUBLISH", from_agent="agent-7", event_type="FOUND_BUG", payload={"n": 1}
        )
        event = next(subscriber.events())
    assert event["id"] == reply["id"]
    assert event["event_type"] == "FOUND_BUG"
    assert event["from_agent"] == "agent-7"
    assert event["payload"] == {"n": 1}
    assert event["task_id"] is None
    assert event["attempt"] == 0
    assert abs(event["ts"] - time.time()) < 60


def test_publish_rejects_task_lifecycle_types(daemon):
    with DaemonClient(daemon.socket) as client:
        for event_type in ("TASK_COMPLETED", "TASK_ANYTHING"):
            with pytest.raises(CommandError) as info:
                client.request(
                    "PUBLISH", from_agent="a", event_type=event_type, payload={}
                )
            assert info.value.code == "INVALID_PARAMS"
            assert "reserved" in info.value.message


@pytest.mark.parametrize("event_type", ["note", "1ABC", "A-B", "A" * 65, ""])
def test_publish_rejects_invalid_event_types(daemon, event_type):
    with DaemonClient(daemon.socket) as client:
        with pytest.raises(CommandError) as info:
            client.request("PUBLISH", from_agent="a", event_type=event_type)
    assert info.value.code == "INVALID_PARAMS"
    assert "event_type" in info.value.message


def test_publish_rejects_oversized_payload(daemon):
    payload = {"blob": "x" * MAX_PAYLOAD_BYTES}
    with DaemonClient(daemon.socket) as client:
        with pytest.raises(CommandError) as info:
            client.request("PUBLISH", from_agent="a", event_type="BIG", payload=payload)
        # The connection stays usable after the error reply.
        assert client.request("HEALTH_CHECK")["daemon"]["pid"] > 0
    size = len(json.dumps(payload, separators=(",", ":")))
    assert f"{size} bytes" in info.value.message
    assert f"{MAX_PAYLOAD_BYTES} bytes" in info.value.message


@pytest.mark.parametrize(
    "params",
    [
        {"event_types": "TASK_QUEUED"},
        {"event_types": []},
        {"event_types": ["lower"]},
        {"since": "yesterday"},
        {"since": "99999999999999999999-0"},
        {"task_id": "bad id"},
        {"unknown": 1},
    ],
)
def test_subscribe_rejects_bad_params(daemon, params):
    with DaemonClient(daemon.socket) as client:
        with pytest.raises(CommandError) as info:
            client.request("SUBSCRIBE", **params)
        assert info.value.code == "INVALID_PARAMS"
        assert client.request("HEALTH_CHECK")["daemon"]["pid"] > 0


def test_subscribe_filters_by_type_and_task(daemon):
    by_type, _ = _subscribe(daemon.socket, event_types=["TASK_QUEUED"])
    with by_type, DaemonClient(daemon.socket) as client:
        client.request("PUBLISH", from_agent="a", event_type="NOTE")
        first = client.request("QUEUE_TASK", prompt="one")["task_id"]
        by_task, _ = _subscribe(daemon.socket, task_id=first)
        with by_task:
            client.request("CANCEL_TASK", task_id=first)
            second = client.request("QUEUE_TASK", prompt="two")["task_id"]
            typed = [next(by_type.events()) for _ in range(2)]
            tasked = next(by_task.events())
    assert [(e["event_type"], e["task_id"]) for e in typed] == [
        ("TASK_QUEUED", first),
        ("TASK_QUEUED", second),
    ]
    assert (tasked["event_type"], tasked["task_id"]) == ("TASK_CANCELLED", first)


def test_since_replays_backlog_without_gaps(daemon):
    ids = _publish_many(daemon.socket, 2500)
    # More events arrive while the replay runs.
    writer = threading.Thread(target=_publish_many, args=(daemon.socket, 1500))
    subscriber, ack = _subscribe(daemon.socket, since=ids[99])
    writer.start()
    received = []
    with subscriber:
        subscriber.sock.settimeout(30)
        for event in subscriber.events():
            received.append(event["id"])
            if len(received) == 2400 + 1500:
                break
    writer.join()
    store = redis.Redis.from_url(daemon.redis_url)
    stored = [entry_id.decode() for entry_id, _ in store.xrange(keys.EVENT_STREAM)]
    assert ack["trimmed"] is False
    assert received == stored[100:]


def test_since_reports_trimmed_events(daemon):
    store = redis.Redis.from_url(daemon.redis_url)
    oldest = store.xadd(keys.EVENT_STREAM, {"event_type": "NOTE"}).decode()
    for _ in range(200):
        store.xadd(keys.EVENT_STREAM, {"event_type": "NOTE"}, maxlen=50)
    newest = store.xrevrange(keys.EVENT_STREAM, count=1)[0][0].decode()
    old_subscriber, old_ack = _subscribe(daemon.socket, since=oldest)
    new_subscriber, new_ack = _subscribe(daemon.socket, since=newest)
    old_subscriber.close()
    new_subscriber.close()
    assert old_ack["trimmed"] is True
    assert new_ack["trimmed"] is False


class LineCounter:
    """Reads many subscriber sockets in one thread and counts their events."""

    def __init__(self, clients: list[DaemonClient]) -> None:
        self.selector = selectors.DefaultSelector()
        self.counts = {client.sock.fileno(): 0 for client in clients}
        self.last = {client.sock.fileno(): b"" for client in clients}
        self.errors: list[bytes] = []
        for client in clients:
            client.sock.setblocking(False)
            self.selector.register(client.sock, selectors.EVENT_READ)
        self.partial: dict[int, bytes] = dict.fromkeys(self.counts, b"")

    def read_until(self, total: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while min(self.counts.values()) < total and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.5):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                data = sock.recv(1 << 20)
                if not data:
                    self.selector.unregister(sock)
                    continue
                fd = sock.fileno()
                lines = (self.partial[fd] + data).split(b"\n")
                self.partial[fd] = lines.pop()
                for line in lines:
                    if line.startswith(b'{"event"'):
                        self.counts[fd] += 1
                        self.last[fd] = line
                    else:
                        self.errors.append(line)


def test_slow_subscriber_dropped_others_served(daemon):
    subscribers = [_subscribe(daemon.socket)[0] for _ in range(200)]
    slow, _ = _subscribe(daemon.socket)
    latencies: list[float] = []
    stop = threading.Event()

    def probe_health() -> None:
        with DaemonClient(daemon.socket) as client:
            while not stop.is_set():
                started = time.monotonic()
                client.request("HEALTH_CHECK")
                latencies.append(time.monotonic() - started)
                time.sleep(0.1)

    counter = LineCounter(subscribers)
    prober = threading.Thread(target=probe_health)
    prober.start()
    published: list[str] = []
    dropped = 0
    try:
        with DaemonClient(daemon.socket) as info_client:
            # The slow subscriber's socket buffers hold some events before its
            # queue fills, so publish until the daemon has dropped it.
            while not dropped and len(published) < 20_000:
                published += _publish_many(daemon.socket, 500, payload={"k": "v"})
                counter.read_until(len(published), timeout_s=60)
                dropped = info_client.request("EVENTS_INFO")["slow_disconnects"]
        counter.read_until(len(published), timeout_s=60)
    finally:
        stop.set()
        prober.join()

    print(
        f"{len(published)} events to 200 subscribers; HEALTH_CHECK max "
        f"{max(latencies) * 1000:.0f} ms over {len(latencies)} probes"
    )
    assert dropped == 1
    assert counter.errors == []
    assert set(counter.counts.values()) == {len(published)}
    last_ids = {json.loads(line)["event"]["id"] for line in counter.last.values()}
    assert last_ids == {published[-1]}
    assert max(latencies) < 1.0, f"HEALTH_CHECK took up to {max(latencies):.2f} s"

    # The slow one finds its buffered events, then the reason, then the end.
    slow.sock.settimeout(30)
    tail = [slow.read_reply()]
    while "event" in tail[-1]:
        tail.append(slow.read_reply())
    assert len(tail) > 1
    assert tail[-1]["status"] == "error"
    assert tail[-1]["error"]["code"] == "SLOW_SUBSCRIBER"
    assert str(SUBSCRIBER_QUEUE_EVENTS) in tail[-1]["error"]["message"]
    assert slow.reader.readline() == b""
    for client in [*subscribers, slow]:
        client.close()


def test_daemon_stop_tells_subscribers(daemon):
    subscriber, _ = _subscribe(daemon.socket)
    with subscriber:
        daemon.process.send_signal(signal.SIGTERM)
        subscriber.sock.settimeout(15)
        with pytest.raises(CommandError) as info:
            next(subscriber.events())
    assert info.value.code == "SHUTTING_DOWN"
    assert "since" in info.value.message
    assert daemon.process.wait(timeout=15) == 0
    assert "Traceback" not in daemon.log.read_text()


# Whole bundle, real CLI.


@pytest.fixture(scope="module")
def events_bundle(stub_api, claude_bin):
    started = start_bundle(stub_api, claude_bin)
    yield started
    started.finish()


def _collect(client: DaemonClient, task_ids: set[str], done: set[str]) -> list[dict]:
    """Read events until every task in ``task_ids`` ended; return them all."""
    events = []
    client.sock.settimeout(120)
    for event in client.events():
        events.append(event)
        if event["task_id"] in task_ids and event["event_type"] in done:
            task_ids = task_ids - {event["task_id"]}
            if not task_ids:
                return events
    raise AssertionError("unreachable")


def _collapse(types: list[str]) -> list[str]:
    """Merge runs of TASK_PROGRESS into one entry."""
    merged: list[str] = []
    for kind in types:
        if not (merged and kind == merged[-1] == "TASK_PROGRESS"):
            merged.append(kind)
    return merged


def test_three_tasks_lifecycle_in_order(events_bundle):
    subscriber, _ = _subscribe(events_bundle.home / "run" / "ksi.sock")
    with subscriber, events_bundle.client() as client:
        task_ids = {
            client.request("QUEUE_TASK", prompt=f"lifecycle {n}")["task_id"]
            for n in range(3)
        }
        events = _collect(subscriber, set(task_ids), {"TASK_COMPLETED"})
    for task_id in task_ids:
        types = [e["event_type"] for e in events if e["task_id"] == task_id]
        assert _collapse(types) == LIFECYCLE, types
        assert types.count("TASK_QUEUED") == 1
        assert types.count("TASK_STARTED") == 1
        assert types.count("TASK_COMPLETED") == 1
        progress = [
            e["payload"]
            for e in events
            if e["task_id"] == task_id and e["event_type"] == "TASK_PROGRESS"
        ]
        assert progress[-1]["turn"] == 1
        assert progress[-1]["text"].startswith("stub answer: lifecycle")
        assert progress[-1]["input_tokens"] > 0
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_resubscribe_after_restart_misses_nothing(events_bundle):
    sock = events_bundle.home / "run" / "ksi.sock"
    subscriber, _ = _subscribe(sock)
    with subscriber, events_bundle.client() as client:
        first = client.request("QUEUE_TASK", prompt="before restart")["task_id"]
        seen = _collect(subscriber, {first}, {"TASK_STARTED"})
    last_id = seen[-1]["id"]

    restarted = events_bundle.ctl("restart", "ksi:daemon")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    # The first task goes on while no daemon runs; queue more once it is back.
    deadline = time.monotonic() + 30
    while True:
        try:
            with events_bundle.client() as client:
                later = {
                    client.request("QUEUE_TASK", prompt=f"after restart {n}")["task_id"]
                    for n in range(2)
                }
            break
        except Exception:
            assert time.monotonic() < deadline, events_bundle.logs_tail()
            time.sleep(0.2)

    resumed, ack = _subscribe(sock, since=last_id)
    with resumed:
        events = _collect(resumed, {first, *later}, {"TASK_COMPLETED"})
    store = events_bundle.redis()
    stored = [
        entry_id.decode()
        for entry_id, _ in store.xrange(keys.EVENT_STREAM, min=f"({last_id}")
    ]
    received = [e["id"] for e in events]
    assert ack["trimmed"] is False
    assert received == stored[: len(received)]
    first_types = [e["event_type"] for e in events if e["task_id"] == first]
    assert _collapse(first_types)[-2:] == ["TASK_PROGRESS", "TASK_COMPLETED"]


def test_idle_timeout_ends_hung_task(events_bundle):
    with events_bundle.client() as client:
        task_id = client.request(
            "QUEUE_TASK", prompt="hang please [stub:hang]", idle_timeout_s=3
        )["task_id"]
    waited = events_bundle.ksi("wait", "--json", "--timeout", "60", task_id)
    assert waited.returncode == 4, waited.stderr + events_bundle.logs_tail()
    record = json.loads(waited.stdout)
    assert record["status"] == "timed_out"
    assert "no output for 3 s" in record["error"]
    assert "idle_timeout_s" in record["error"]
    assert record["elapsed_s"] < 30
    assert find_task_processes(task_id) == []


def test_watch_resumes_across_daemon_stop(events_bundle):
    with events_bundle.client() as client:
        task_id = client.request("QUEUE_TASK", prompt="gap task [stub:slow=2]")[
            "task_id"
        ]
    watch = subprocess.Popen(
        [BIN / "ksi", "watch", "--json", "--task", task_id, "--type", "TASK_COMPLETED",
         "--count", "1"],
        env=events_bundle.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # let watch subscribe
        assert events_bundle.ctl("stop", "ksi:daemon").returncode == 0
        store = events_bundle.redis()
        deadline = time.monotonic() + 60
        while store.hget(keys.task(task_id), "status") != b'"succeeded"':
            assert time.monotonic() < deadline, events_bundle.logs_tail()
            time.sleep(0.2)
        # The task ended while no daemon ran; watch must still print its end.
        assert events_bundle.ctl("start", "ksi:daemon").returncode == 0
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    event = json.loads(out)
    assert event["event_type"] == "TASK_COMPLETED"
    assert event["task_id"] == task_id
