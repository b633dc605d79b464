"""Run every benchmark of KSI, with plain Dramatiq and Celery baselines.

Usage, from the project root: ``.venv/bin/python -m bench [--smoke]``.

It starts everything it measures in temporary folders under /tmp and stops it
again. That is a KSI bundle whose ``claude`` is the instant fake, and plain
Dramatiq and Celery workers, each baseline on its own redis-server (unix
socket, no TCP port). Then a second bundle with the real pinned CLI and the
local Messages API stand-in, and the setups of the older scripts of
``bench/``. The three queues run side by
side and their runs are interleaved, so a change in the machine's load hits
all three alike. A full run writes its summary at the top of
``bench/RESULTS.md``; ``--smoke`` runs tiny counts and writes only where
``--output`` says.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import redis

from bench.report import Figure, Results, Target, write_summary
from bench.scenarios import (
    LatencyRun,
    dispatch_run,
    percentile,
    pickup_run,
    throughput_run,
)
from bench.systems import KsiSystem, PlainCelery, PlainDramatiq, System
from tests.bundle import Bundle, free_port, project_claude_bin

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = PROJECT_ROOT / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run."""

    runs: int = 5
    dispatch_tasks: int = 100
    dispatch_rate_per_s: float = 20.0
    pickup_tasks: int = 6
    idle_s: float = 2.0
    throughput_tasks: int = 1000
    e2e_runs: int = 5
    e2e_warm_up: bool = True
    fanout_subscribers: int = 100
    fanout_events: int = 20_000
    reaper_processes: int = 2000
    metrics_workers: int = 16
    metrics_scrapes: int = 15


FULL = Plan()
SMOKE = Plan(
    runs=1,
    dispatch_tasks=4,
    dispatch_rate_per_s=50.0,
    pickup_tasks=2,
    idle_s=0.2,
    throughput_tasks=20,
    e2e_runs=1,
    e2e_warm_up=False,
    fanout_subscribers=5,
    fanout_events=50,
    reaper_processes=50,
    metrics_workers=2,
    metrics_scrapes=3,
)

BENCHMARKS = ("queues", "e2e", "fanout", "reaper", "metrics")


def ensure_celery(install: bool) -> None:
    """Install the ``bench`` extra of pyproject.toml when Celery is missing."""
    try:
        import celery  # noqa: F401
    except ImportError:
        if not install:
            raise SystemExit(
                "Celery is not installed; run .venv/bin/pip install -e '.[bench]' "
                "or drop --no-install"
            ) from None
        print("Installing the bench extra (Celery) into the venv.", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q"]
            + ["--disable-pip-version-check", "-e", f"{PROJECT_ROOT}[bench]"],
            check=True,
        )


def describe_machine() -> list[str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()
    redis_server = next(
        (part[2:] for part in redis_version if part.startswith("v=")), "unknown"
    )
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("dramatiq", "celery", "kombu", "redis", "psutil")
    )
    memory_gib = psutil.virtual_memory().total / 2**30
    return [
        f"Machine: {os.cpu_count()} cores ({model}), {memory_gib:.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, Redis {redis_server}; {versions}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
    ]


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class QueueFigures:
    """The figures measured on all three queues."""

    def __init__(self, results: Results, plan: Plan) -> None:
        self.results = results
        figure = results.figure
        self.dispatch_child_p50 = figure("dispatch p50, send to child start", "ms")
        self.dispatch_child_p99 = figure("dispatch p99, send to child start", "ms")
        self.dispatch_actor_p50 = figure("dispatch p50, send to task start", "ms")
        self.dispatch_actor_p99 = figure("dispatch p99, send to task start", "ms")
        idle = f"{plan.idle_s:g} s"
        self.pickup_child = figure(f"pickup after {idle} idle p50, to child", "ms")
        self.pickup_actor = figure(f"pickup after {idle} idle p50, to task", "ms")
        self.idle_cpu = figure("idle CPU of the group", "% of a core", digits=2)
        self.throughput = figure(
            f"throughput, {plan.throughput_tasks} tasks", "tasks/s", digits=0
        )
        self.worker_rss = figure("worker program RSS (parent + child)", "MB")
        self.redis_rss = figure("redis-server RSS", "MB")
        self.group_rss = figure("whole group RSS", "MB")
        self.program_rss: dict[str, Figure] = {}

    def add_latency(self, name: str, run: LatencyRun, *, pickup: bool) -> None:
        if pickup:
            self.pickup_child.add(name, percentile(run.to_child_ms, 0.5))
            self.pickup_actor.add(name, percentile(run.to_actor_ms, 0.5))
            self.idle_cpu.add(name, run.idle_cpu_percent)
            return
        self.dispatch_child_p50.add(name, percentile(run.to_child_ms, 0.5))
        self.dispatch_child_p99.add(name, percentile(run.to_child_ms, 0.99))
        self.dispatch_actor_p50.add(name, percentile(run.to_actor_ms, 0.5))
        self.dispatch_actor_p99.add(name, percentile(run.to_actor_ms, 0.99))

    def add_memory(self, system: System) -> None:
        programs = system.programs()
        workers = [
            rss_mb(group) for name, group in programs.items() if "worker" in name
        ]
        self.worker_rss.add(system.name, statistics.mean(workers))
        self.redis_rss.add(system.name, rss_mb(programs["redis"]))
        self.group_rss.add(
            system.name, sum(rss_mb(group) for group in programs.values())
        )
        if system.name != "KSI":
            return
        for name, group in sorted(programs.items()):
            if "worker" in name:
                continue
            if name not in self.program_rss:
                self.program_rss[name] = self.results.figure(
                    f"{name} program RSS", "MB", alone=True
                )
            self.program_rss[name].add("KSI", rss_mb(group))


def bench_queues(results: Results, plan: Plan) -> list[str]:
    """Measure dispatch, pickup, throughput, idle CPU and memory of all three."""
    figures = QueueFigures(results, plan)
    systems: list[System] = [KsiSystem(), PlainDramatiq(), PlainCelery()]
    left: list[str] = []
    try:
        print("Starting KSI, plain Dramatiq and Celery.", flush=True)
        # Started side by side, since most of a start is waiting for processes.
        with ThreadPoolExecutor(max_workers=len(systems)) as pool:
            for started in [pool.submit(system.start) for system in systems]:
                started.result()
        for run in range(1, plan.runs + 1):
            for system in systems:
                latency = dispatch_run(
                    system, plan.dispatch_tasks, plan.dispatch_rate_per_s
                )
                figures.add_latency(system.name, latency, pickup=False)
            for system in systems:
                latency = pickup_run(system, plan.pickup_tasks, plan.idle_s)
                figures.add_latency(system.name, latency, pickup=True)
                figures.add_memory(system)
            for system in systems:
                rate = throughput_run(system, plan.throughput_tasks)
                figures.throughput.add(system.name, rate)
            print(f"Queues: run {run} of {plan.runs} done.", flush=True)
    finally:
        with ThreadPoolExecutor(max_workers=len(systems)) as pool:
            stops = {system.name: pool.submit(system.stop) for system in systems}
        for name, stopped in stops.items():
            left += [f"{name}: {line}" for line in stopped.result()]
    return left


def bench_e2e(results: Results, plan: Plan) -> list[str]:
    """Time one real CLI task through ``ksi submit --wait`` and run directly."""
    from bench.e2e_overhead import bundle_run, direct_run, start_stub

    direct = results.figure(
        "claude run directly (real CLI, stand-in API)", "s", alone=True, digits=3
    )
    through = results.figure("ksi submit --wait, same call", "s", alone=True, digits=3)
    overhead = results.figure(
        "overhead of ksi submit --wait", "ms", alone=True, digits=0
    )
    folder = Path(tempfile.mkdtemp(prefix="ksi-bench-e2e-", dir="/tmp"))
    stub, base_url = start_stub(folder)
    bundle = Bundle(
        {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "stub-key",
            "KSI_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    claude = project_claude_bin()
    try:
        bundle.start()
        if plan.e2e_warm_up:
            # Untimed first runs: the first CLI start of a worker and of the
            # disk cache are slower than the rest.
            bundle_run(bundle)
            direct_run(claude, base_url, folder)
        for _ in range(plan.e2e_runs):
            direct_s = direct_run(claude, base_url, folder)
            through_s = bundle_run(bundle)
            direct.add("KSI", direct_s)
            through.add("KSI", through_s)
            overhead.add("KSI", (through_s - direct_s) * 1000)
    finally:
        left = bundle.stop()
        bundle.cleanup()
        stub.terminate()
        stub.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    return [f"e2e bundle: {line}" for line in left]


def bench_fanout(results: Results, plan: Plan) -> list[str]:
    """Measure the daemon's event deliveries per second to many subscribers."""
    from bench.event_fanout import one_run, start_daemon, start_redis
    from ksi_worker.store import TaskStore

    deliveries = results.figure(
        f"event fan-out, {plan.fanout_subscribers} subscribers",
        "deliveries/s",
        alone=True,
        digits=0,
    )
    each = results.figure(
        "event fan-out, events/s to each subscriber", "events/s", alone=True, digits=0
    )
    folder = Path(tempfile.mkdtemp(prefix="ksi-bench-fanout-", dir="/tmp"))
    redis_process, redis_url = start_redis(folder)
    daemon = None
    try:
        daemon, sock_path = start_daemon(folder, redis_url)
        store = TaskStore(redis.Redis.from_url(redis_url))
        payload = {"data": "x" * 100}
        for _ in range(plan.runs):
            elapsed = one_run(
                sock_path,
                store,
                {},
                plan.fanout_subscribers,
                plan.fanout_events,
                payload,
            )
            deliveries.add(
                "KSI", plan.fanout_events * plan.fanout_subscribers / elapsed
            )
            each.add("KSI", plan.fanout_events / elapsed)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=15)
        redis_process.terminate()
        redis_process.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)
    return []


def bench_reaper(results: Results, plan: Plan) -> list[str]:
    """Measure the CPU time of one reaper scan among many unrelated processes."""
    from bench.reaper_scan import redis_server, sleepers
    from ksi_worker.reaper import Reaper

    scan = results.figure(
        f"reaper scan, {plan.reaper_processes} unrelated processes",
        "CPU ms",
        alone=True,
    )
    with redis_server() as client, sleepers(plan.reaper_processes):
        reaper = Reaper(
            client,
            bundle_home="/nonexistent/bench",
            kill_grace_s=1,
            deadline_grace_s=60,
            default_timeout_s=600,
        )
        reaper.scan()  # untimed: imports and caches
        for _ in range(plan.runs):
            started = time.process_time()
            reaper.scan()
            scan.add("KSI", (time.process_time() - started) * 1000)
    return []


def bench_metrics(results: Results, plan: Plan) -> list[str]:
    """Measure one /metrics scrape of the exporter with many worker processes."""
    from bench.metrics_scrape import run_scenario

    scrape = results.figure(
        f"/metrics scrape, {plan.metrics_workers} worker processes "
        f"({plan.metrics_scrapes} scrapes)",
        "ms",
        alone=True,
    )
    timings = run_scenario(plan.metrics_workers, 0, plan.metrics_scrapes)
    scrape.summaries["KSI"] = (
        timings["median_ms"],
        timings["min_ms"],
        timings["max_ms"],
    )
    return []


def judge(results: Results, plan: Plan) -> None:
    """Add the targets of the benchmark, judged on this run's medians."""
    by_title = {figure.title: figure for figure in results.compared + results.alone}

    def median(title_start: str, system: str = "KSI") -> float | None:
        for title, figure in by_title.items():
            if title.startswith(title_start):
                return figure.median(system)
        return None

    def target(text: str, measured: float | None, unit: str, test: Callable) -> None:
        if measured is None:
            return
        results.targets.append(
            Target(text, f"{measured:,.2f} {unit}", bool(test(measured)))
        )

    ksi_child = median("dispatch p50, send to child")
    dramatiq_task = median("dispatch p50, send to task", "Dramatiq")
    celery_task = median("dispatch p50, send to task", "Celery")
    if dramatiq_task and celery_task:
        target(
            f"dispatch p50 (KSI to child start) at most 1.2x plain Dramatiq's "
            f"send to task start ({dramatiq_task:.2f} ms)",
            ksi_child,
            "ms",
            lambda value: value <= 1.2 * dramatiq_task,
        )
        target(
            f"dispatch p50 (KSI to child start) below Celery's send to task start "
            f"({celery_task:.2f} ms)",
            ksi_child,
            "ms",
            lambda value: value < celery_task,
        )
    target(
        f"pickup after {plan.idle_s:g} s idle, p50 to child start, at most 10 ms",
        median("pickup after"),
        "ms",
        lambda value: value <= 10,
    )
    target(
        "idle CPU of the whole group under 2% of one core",
        median("idle CPU"),
        "%",
        lambda value: value < 2,
    )
    dramatiq_rate = median("throughput", "Dramatiq")
    if dramatiq_rate:
        target(
            f"throughput at least 0.8x plain Dramatiq ({dramatiq_rate:,.0f} tasks/s)",
            median("throughput"),
            "tasks/s",
            lambda value: value >= 0.8 * dramatiq_rate,
        )
    direct = median("claude run directly")
    if direct:
        target(
            f"ksi submit --wait within 5% + 50 ms of the direct call "
            f"({direct:.3f} s, so at most {direct * 1.05 + 0.05:.3f} s)",
            median("ksi submit --wait"),
            "s",
            lambda value: value <= direct * 1.05 + 0.05,
        )
    # Judged on events/s, each event reaching every subscriber, the stricter
    # reading of "events/s"; deliveries/s is that times the subscribers.
    target(
        "event fan-out to 100 subscribers: 20,000 events/s or more, each event "
        "reaching all 100",
        median("event fan-out, events/s") if plan.fanout_subscribers == 100 else None,
        "events/s",
        lambda value: value >= 20_000,
    )
    target(
        "reaper scan with 2,000 unrelated processes under 50 CPU ms",
        median("reaper scan") if plan.reaper_processes == 2000 else None,
        "CPU ms",
        lambda value: value < 50,
    )
    target(
        "/metrics scrape with 16 worker processes under 100 ms",
        median("/metrics scrape") if plan.metrics_workers == 16 else None,
        "ms",
        lambda value: value < 100,
    )
    dramatiq_rss = median("worker program RSS", "Dramatiq")
    if dramatiq_rss:
        target(
            f"worker RSS at most 1.3x a plain Dramatiq worker ({dramatiq_rss:.1f} MB)",
            median("worker program RSS"),
            "MB",
            lambda value: value <= 1.3 * dramatiq_rss,
        )


RUNNERS: dict[str, Callable[[Results, Plan], list[str]]] = {
    "queues": bench_queues,
    "e2e": bench_e2e,
    "fanout": bench_fanout,
    "reaper": bench_reaper,
    "metrics": bench_metrics,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny counts, to check that it runs."
    )
    parser.add_argument(
        "--runs", type=int, help="Runs of each benchmark (default 5, smoke 1)."
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        help="Run only this benchmark (repeatable; default all).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Markdown file whose summary section is replaced (default "
        "bench/RESULTS.md, none with --smoke).",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="Fail instead of installing Celery when it is missing.",
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error(f"--runs {args.runs} is below 1")
        plan = replace(plan, runs=args.runs)
    output = args.output or (None if args.smoke else RESULTS_PATH)
    selected = args.only or list(BENCHMARKS)
    if "queues" in selected:
        ensure_celery(install=not args.no_install)

    command = "python -m bench " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    results = Results(
        command=command.strip(), machine=describe_machine(), runs=plan.runs
    )
    load_before = load_text()
    started = time.monotonic()
    left: list[str] = []
    for name in selected:
        print(f"Running {name}.", flush=True)
        benchmark_started = time.monotonic()
        left += RUNNERS[name](results, plan)
        print(f"{name} took {time.monotonic() - benchmark_started:.0f} s.", flush=True)
    judge(results, plan)
    results.machine.append(
        f"Load average (1, 5, 15 min) {load_before} at the start and "
        f"{load_text()} at the end; the run took {time.monotonic() - started:.0f} s."
    )
    if left:
        results.notes.append(f"Processes killed at shutdown: {left}")
    summary = results.markdown()
    print(summary)
    if output is not None:
        write_summary(output, summary)
        print(f"Summary written to {output}.")
    if left:
        print(f"Processes had to be killed at shutdown: {left}", file=sys.stderr)
        return 1
    return 0
