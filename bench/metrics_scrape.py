"""Measure how long one scrape of the metrics program's /metrics takes.

For each scenario it writes the multiprocess files of N live worker
processes, a daemon and a reaper. Optionally it also writes those of workers
that already exited, as restarts leave them. Then it starts the real exporter
(``python -m ksi_worker.exporter``) on a private redis-server and times
HTTP GETs of /metrics. Each worker records what a busy worker records: every
outcome, retries, dead letters, cost, four token kinds and its in-progress
gauge, over 200 simulated tasks.

Usage: .venv/bin/python bench/metrics_scrape.py [--runs 15] [--scenario 16:0 ...]
A scenario is LIVE_WORKERS:EXITED_WORKERS.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Scenarios run when none is given: live workers, exited workers.
DEFAULT_SCENARIOS = ["2:0", "16:0", "16:200"]

#: Scrapes before timing starts, so imports and the first Redis script load
#: are not measured.
WARMUP_SCRAPES = 3

# Each process records into PROMETHEUS_MULTIPROC_DIR and then either exits or
# waits until its stdin closes, as a live worker would.
WORKER = """
import random, sys
from ksi_worker import metrics
random.seed(int(sys.argv[2]))
queue = "claude"
metrics.IN_PROGRESS.labels(queue).set(1)
outcomes = ["succeeded"] * 90 + ["failed"] * 4 + ["timed_out"] * 2 + ["cancelled"] * 4
for _ in range(200):
    outcome = random.choice(outcomes)
    metrics.QUEUE_WAIT.labels(queue).observe(random.expovariate(1 / 20))
    if random.random() < 0.05:
        metrics.RETRIES.labels(queue).inc()
        metrics.CLAUDE_RUN.labels(queue, "retried").observe(random.uniform(1, 30))
    metrics.CLAUDE_RUN.labels(queue, outcome).observe(random.uniform(10, 900))
    metrics.count_terminal(queue, metrics.TaskStatus(outcome), random.uniform(10, 1800))
    if outcome == "failed":
        metrics.DEAD_LETTERS.labels(queue).inc()
    metrics.COST.labels(queue).inc(random.uniform(0.01, 2))
    for kind in metrics.TOKEN_KINDS.values():
        metrics.TOKENS.labels(queue, kind).inc(random.randint(0, 50_000))
print("written", flush=True)
if sys.argv[1] == "stay":
    sys.stdin.read()
"""

DAEMON = """
import sys
from daemon import metrics
metrics.CONNECTIONS.set(3)
for command in ["QUEUE_TASK", "TASK_STATUS", "LIST_TASKS", "CANCEL_TASK",
                "RETRY_TASK", "HEALTH_CHECK", "SUBSCRIBE", "unknown"]:
    for result in ["ok", "NOT_FOUND", "INVALID_PARAMS"]:
        metrics.COMMANDS.labels(command, result).inc(100)
print("written", flush=True)
sys.stdin.read()
"""

REAPER = """
import sys
from ksi_worker import reaper_metrics
metrics = reaper_metrics.PrometheusReaperMetrics()
for n in range(500):
    metrics.observe_scan(0.02, n % 3)
metrics.count_kill("worker_gone")
print("written", flush=True)
sys.stdin.read()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, event: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{event} did not happen within {timeout_s} s")
        time.sleep(0.05)


def start_writer(code: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if process.stdout.readline().strip() != "written":
        raise SystemExit(f"writer pid {process.pid} failed; see its stderr above")
    return process


def start_redis(home: Path) -> tuple[subprocess.Popen, str]:
    sock = home / "redis.sock"
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(home)]
        + ["--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{sock}?db=0"
    client = redis.Redis.from_url(url)

    def pingable() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(pingable, 10, "redis-server start")
    # A queue with some backlog and dead letters, as a busy bundle has.
    for n in range(50):
        client.rpush("dramatiq:claude", f"m{n}")
        client.hset("dramatiq:claude.msgs", f"m{n}", '{"message_timestamp": 1}')
    client.zadd("dramatiq:claude.XQ", {f"d{n}": n for n in range(5)})
    return process, url


def scrape_once(url: str) -> float:
    """Return the seconds one GET of ``url`` took, body read included."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as reply:
        reply.read()
    return time.perf_counter() - started


def run_scenario(live: int, exited: int, runs: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="ksi-bench-", dir="/tmp"))
    folder = home / "prometheus"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "KSI_HOME": str(home)}
    processes: list[subprocess.Popen] = []
    redis_process, redis_url = start_redis(home)
    try:
        for n in range(exited):
            writer = start_writer(WORKER, env, "exit", str(1000 + n))
            writer.wait(timeout=30)
        for n in range(live):
            processes.append(start_writer(WORKER, env, "stay", str(n)))
        processes.append(start_writer(DAEMON, env))
        processes.append(start_writer(REAPER, env))

        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "ksi_worker.exporter"],
            env={
                **env,
                "KSI_REDIS_URL": redis_url,
                "KSI_METRICS_ADDR": f"127.0.0.1:{port}",
            },
            cwd=PROJECT_ROOT,
            stderr=subprocess.DEVNULL,
        )
        processes.append(exporter)
        url = f"http://127.0.0.1:{port}/metrics"

        def serving() -> bool:
            try:
                scrape_once(url)
                return True
            except OSError:
                return False

        wait_until(serving, 20, "exporter start")
        for _ in range(WARMUP_SCRAPES):
            scrape_once(url)
        timings = []
        for _ in range(runs):
            elapsed = scrape_once(url)
            timings.append(elapsed * 1000)
        return {
            "files": len(list(folder.glob("*.db"))),
            "median_ms": statistics.median(timings),
            "min_ms": min(timings),
            "max_ms": max(timings),
        }
    finally:
        for process in processes:
            if process.stdin:
                process.stdin.close()
            else:
                process.terminate()
        for process in processes:
            process.wait(timeout=30)
        redis_process.terminate()
        redis_process.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def describe_machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"Machine: {os.cpu_count()} CPUs ({model}), Python "
        f"{platform.python_version()}, prometheus-client "
        f"{importlib.metadata.version('prometheus-client')}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed scrapes (>= 5)")
    parser.add_argument(
        "--scenario",
        action="append",
        help="LIVE_WORKERS:EXITED_WORKERS (repeatable; default 2:0 16:0 16:200)",
    )
    args = parser.parse_args()
    if args.runs < 5:
        parser.error(f"--runs {args.runs} is below 5; a median needs at least 5 runs")
    print(describe_machine())
    print(f"Timed scrapes per scenario: {args.runs}, after {WARMUP_SCRAPES} untimed.")
    print("| live workers | exited workers | files | median ms | min ms | max ms |")
    print("|---|---|---|---|---|---|")
    for scenario in args.scenario or DEFAULT_SCENARIOS:
        live, exited = (int(part) for part in scenario.split(":"))
        result = run_scenario(live, exited, args.runs)
        print(
            f"| {live} | {exited} | {result['files']} | {result['median_ms']:.1f} "
            f"| {result['min_ms']:.1f} | {result['max_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
