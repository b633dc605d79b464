"""CPU time of one reaper scan with many unrelated processes on the host.

Usage: ``.venv/bin/python bench/reaper_scan.py [--runs N] [COUNT ...]``
(default: 7 runs at 500 and 2000 processes).

For each COUNT it starts that many ``sleep`` children without a marker, then
times ``Reaper.scan()`` against a private redis-server with
``time.process_time()`` (user plus system CPU of this process, which includes
the kernel's work of reading /proc). It reports the median of the runs. For
comparison it times the same walk done the plain psutil way, building a
``psutil.Process`` and parsing the environment of every process.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ksi_worker.proctree import MARKER_TASK_ID  # noqa: E402
from ksi_worker.reaper import Reaper  # noqa: E402

#: Seconds the benchmark waits for its redis-server to accept connections.
REDIS_START_TIMEOUT_S = 10.0


@contextmanager
def redis_server() -> Iterator[redis.Redis]:
    folder = Path(tempfile.mkdtemp(prefix="ksi-bench-"))
    sock = folder / "redis.sock"
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", ""],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def sleepers(count: int) -> Iterator[None]:
    """Start ``count`` unmarked ``sleep`` children, and kill and reap them on exit."""
    children = []
    try:
        for _ in range(count):
            children.append(
                subprocess.Popen(["sleep", "600"], env={"PATH": os.environ["PATH"]})
            )
        yield
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def plain_psutil_walk() -> int:
    """Count marked processes by parsing every process's environment with psutil."""
    marked = 0
    for process in psutil.process_iter():
        try:
            if MARKER_TASK_ID in process.environ():
                marked += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return marked


def median_cpu_ms(action: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.process_time()
        action()
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[500, 2000])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    memory_gib = psutil.virtual_memory().total / 2**30
    print(
        f"{os.cpu_count()} CPUs, {memory_gib:.0f} GiB, Python "
        f"{platform.python_version()}, psutil {psutil.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("| sleep children | processes on host | scan CPU ms | plain psutil CPU ms |")
    print("|---:|---:|---:|---:|")
    with redis_server() as client:
        reaper = Reaper(
            client,
            bundle_home="/nonexistent/bench",
            kill_grace_s=1,
            deadline_grace_s=60,
            default_timeout_s=600,
        )
        for count in args.counts:
            with sleepers(count):
                on_host = len(psutil.pids())
                # One scan first, so imports and caches are warm for every run.
                reaper.scan()
                scan_ms = median_cpu_ms(reaper.scan, args.runs)
                plain_ms = median_cpu_ms(plain_psutil_walk, args.runs)
            print(f"| {count} | {on_host} | {scan_ms:.1f} | {plain_ms:.1f} |")


if __name__ == "__main__":
    main()
