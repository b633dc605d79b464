"""Benchmark: events per second the daemon's event bus delivers to subscribers.

Starts a private redis-server and ``python -m daemon`` under /tmp, connects
``--subscribers`` SUBSCRIBE connections (read by one separate process), then
appends ``--events`` events to ``ksi:events`` with pipelined XADD, so that the
daemon's fan-out is what is measured rather than the PUBLISH command. The
publisher waits whenever the slowest subscriber is ``MAX_BACKLOG_EVENTS``
behind, because the daemon disconnects a subscriber that falls 1000 events
behind, and the reading process is then the slower side. A run lasts from the
first XADD until every subscriber has received every event. Prints each run
and the median of ``--runs`` runs.

    .venv/bin/python bench/event_fanout.py --subscribers 100 --events 20000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from ksi_worker import keys  # noqa: E402
from ksi_worker.store import TaskStore  # noqa: E402

#: Seconds a run may take before the benchmark gives up.
RUN_TIMEOUT_S = 300

#: Events per XADD pipeline.
PIPELINE_EVENTS = 250

#: Most events the slowest subscriber may lag behind the publisher.
MAX_BACKLOG_EVENTS = 750

#: Seconds between two reports of the slowest subscriber's count.
PROGRESS_INTERVAL_S = 0.005


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    sock = folder / "redis.sock"
    process = subprocess.Popen(
        [
            "redis-server",
            "--port", "0",
            "--unixsocket", str(sock),
            "--dir", str(folder),
            "--save", "",
            "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{sock}?db=0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def start_daemon(folder: Path, redis_url: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "KSI_HOME": str(folder), "KSI_REDIS_URL": redis_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon"],
        cwd=PROJECT_ROOT,
        env=env,
        stderr=(folder / "daemon.log").open("wb"),
    )
    sock = folder / "run" / "ksi.sock"
    deadline = time.monotonic() + 15
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((folder / "daemon.log").read_text())
        time.sleep(0.05)
    return process, sock


def subscribe(sock_path: Path, params: dict) -> socket.socket:
    """Open one subscription and read its acknowledgement."""
    request = json.dumps({"command": "SUBSCRIBE", "params": params}).encode() + b"\n"
    deadline = time.monotonic() + 10
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(sock_path))
        conn.sendall(request)
        ack = b""
        while not ack.endswith(b"\n"):
            ack += conn.recv(4096)
        if b'"status":"ok"' in ack:
            return conn
        conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"SUBSCRIBE failed: {ack!r}")
        time.sleep(0.1)


def read_all(
    sock_path: Path, params: dict, subscribers: int, events: int, pipe, slowest
) -> None:
    """Subscribe, report ready, count lines; report when all got everything.

    ``slowest`` is a shared integer set to the lowest count of any subscriber.
    """
    conns = [subscribe(sock_path, params) for _ in range(subscribers)]
    selector = selectors.DefaultSelector()
    counts = {}
    for conn in conns:
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
        counts[conn.fileno()] = 0
    pipe.send("ready")
    complete = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S
    next_report = 0.0
    while complete < subscribers and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_report:
            slowest.value = min(counts.values())
            next_report = now + PROGRESS_INTERVAL_S
        for key, _ in selector.select(timeout=0.01):
            conn = key.fileobj
            data = conn.recv(1 << 20)
            if not data:
                raise RuntimeError("a subscriber was disconnected")
            fd = conn.fileno()
            before = counts[fd]
            counts[fd] += data.count(b"\n")
            if before < events <= counts[fd]:
                complete += 1
    pipe.send(time.monotonic() if complete == subscribers else None)
    for conn in conns:
        conn.close()


def one_run(
    sock_path: Path,
    store: TaskStore,
    params: dict,
    subscribers: int,
    events: int,
    payload: dict,
) -> float:
    """Return the seconds from the first XADD until all subscribers had all."""
    parent, child = multiprocessing.Pipe()
    slowest = multiprocessing.Value("q", 0, lock=False)
    reader = multiprocessing.Process(
        target=read_all,
        args=(sock_path, params, subscribers, events, child, slowest),
    )
    reader.start()
    if parent.recv() != "ready":
        raise RuntimeError("reader failed to subscribe")
    started = time.monotonic()
    fields = store._event_fields("BENCH", None, payload, attempt=0)
    for first in range(0, events, PIPELINE_EVENTS):
        while first - slowest.value > MAX_BACKLOG_EVENTS - PIPELINE_EVENTS:
            if not reader.is_alive():
                raise RuntimeError("the reading process failed")
            time.sleep(0.001)
        pipe = store.client.pipeline(transaction=False)
        for _ in range(min(PIPELINE_EVENTS, events - first)):
            pipe.xadd(keys.EVENT_STREAM, fields, maxlen=100_000, approximate=True)
        pipe.execute()
    if not parent.poll(RUN_TIMEOUT_S):
        raise RuntimeError("the reading process did not report")
    finished = parent.recv()
    reader.join()
    if finished is None:
        raise RuntimeError(f"not every subscriber got {events} events in time")
    return finished - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--payload-bytes", type=int, default=100, help="Size of each event's payload."
    )
    parser.add_argument(
        "--filter",
        action="store_true",
        help="Subscribe with event_types=[BENCH] instead of no filter.",
    )
    args = parser.parse_args()
    params = {"event_types": ["BENCH"]} if args.filter else {}

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}, redis-py {redis.__version__}, hiredis "
        f"{'on' if HIREDIS_AVAILABLE else 'off'}"
    )
    folder = Path(tempfile.mkdtemp(prefix="ksi-fanout-", dir="/tmp"))
    redis_process, redis_url = start_redis(folder)
    daemon = None
    try:
        daemon, sock_path = start_daemon(folder, redis_url)
        store = TaskStore(redis.Redis.from_url(redis_url))
        payload = {"data": "x" * args.payload_bytes}
        rates = []
        for run in range(1, args.runs + 1):
            elapsed = one_run(
                sock_path, store, params, args.subscribers, args.events, payload
            )
            delivered = args.events * args.subscribers
            rates.append(delivered / elapsed)
            print(
                f"run {run}: {args.events} events x {args.subscribers} subscribers "
                f"in {elapsed:.2f} s = {delivered / elapsed:,.0f} deliveries/s "
                f"({args.events / elapsed:,.0f} events/s to each)"
            )
        median = statistics.median(rates)
        print(
            f"median of {args.runs}: {median:,.0f} deliveries/s "
            f"({median / args.subscribers:,.0f} events/s to each of "
            f"{args.subscribers} subscribers)"
        )
        print(json.dumps({"median_deliveries_per_s": round(median), "runs": rates}))
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=15)
        redis_process.terminate()
        redis_process.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
