"""Dispatch latency, pickup after idle and throughput, for any System."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import psutil

from bench.systems import System

#: Seconds a latency run waits for its tasks to finish.
FINISH_TIMEOUT_S = 60.0

#: Seconds between two checks of a throughput run's finished count.
COUNT_INTERVAL_S = 0.005


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile: the smallest value with at least
    ``fraction`` of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LatencyRun:
    """Latencies of one run, in milliseconds, from send to each start point."""

    to_actor_ms: list[float] = field(default_factory=list)
    to_child_ms: list[float] = field(default_factory=list)
    #: CPU seconds the group used while idle, and the idle seconds, if measured.
    idle_cpu_s: float = 0.0
    idle_s: float = 0.0

    def add(self, sent: float, actor: float, child: float) -> None:
        self.to_actor_ms.append((actor - sent) * 1000)
        self.to_child_ms.append((child - sent) * 1000)

    @property
    def idle_cpu_percent(self) -> float:
        """Group CPU while idle, as a percentage of one core."""
        return 100 * self.idle_cpu_s / self.idle_s if self.idle_s else 0.0


def dispatch_run(system: System, tasks: int, rate_per_s: float) -> LatencyRun:
    """Send ``tasks`` tasks at a steady rate and measure each one's latency."""
    system.clear()
    interval_s = 1 / rate_per_s
    started = time.monotonic()
    tags = []
    for n in range(tasks):
        tags.append(system.send())
        pause = started + (n + 1) * interval_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    run = LatencyRun()
    for timing in system.wait_finished(tags, FINISH_TIMEOUT_S).values():
        run.add(timing.sent, timing.actor, timing.child)
    return run


def group_cpu_s(processes: list[psutil.Process]) -> dict[int, float]:
    """Return the user plus system CPU seconds of each live process, by pid."""
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def pickup_run(system: System, tasks: int, idle_s: float) -> LatencyRun:
    """Send ``tasks`` tasks one at a time, each after ``idle_s`` of quiet.

    The group's CPU time is measured over each quiet spell, which starts once
    the previous task has finished.
    """
    system.clear()
    processes = system.all_processes()
    run = LatencyRun()
    for _ in range(tasks):
        before = group_cpu_s(processes)
        quiet_from = time.monotonic()
        time.sleep(idle_s)
        after = group_cpu_s(processes)
        run.idle_s += time.monotonic() - quiet_from
        run.idle_cpu_s += sum(
            after[pid] - before[pid] for pid in after.keys() & before.keys()
        )
        tag = system.send()
        timing = system.wait_finished([tag], FINISH_TIMEOUT_S)[tag]
        run.add(timing.sent, timing.actor, timing.child)
    return run


def throughput_run(system: System, tasks: int) -> float:
    """Send ``tasks`` tasks at once; return tasks per second until all finished."""
    system.clear()
    started = time.time()
    system.send_many(tasks)
    deadline = time.monotonic() + FINISH_TIMEOUT_S + tasks / 10
    while system.finished_count() < tasks:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{system.name}: {system.finished_count()} of {tasks} tasks "
                "finished in time"
            )
        time.sleep(COUNT_INTERVAL_S)
    return tasks / (time.time() - started)
