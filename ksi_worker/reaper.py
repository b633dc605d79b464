"""The reaper: find Claude process trees that no live task owns and kill them.

``python -m ksi_worker.reaper`` runs as the program ``reaper`` of
``[group:ksi]``. Every ``KSI_REAPER_INTERVAL_S`` seconds it reads the marker
variables of every process (see :mod:`ksi_worker.proctree`) and keeps those
whose ``KSI_BUNDLE_HOME`` is this bundle's ``KSI_HOME``, because bundles on one
host see each other's processes. All processes with the same marker belong to
one attempt of one task on one worker, and are judged together. They are
orphaned when the first of these rules holds:

1. ``worker_gone``: no live process has the pid ``KSI_WORKER_PID`` with the
   create time ``KSI_WORKER_CREATED``. A zombie counts as gone. So does a pid
   now held by a process with another create time, unless Redis holds a live
   heartbeat of that worker pid with the marker's create time. The heartbeat
   is the worker's own record, so a wall clock step since the worker started,
   which shifts every create time psutil computes, does not change it.
2. ``task_not_running``: the task has no record, its status is not
   ``running``, or the running attempt is another one: its ``attempt`` or its
   ``worker_pid`` differs from the marker's. Both are compared because a
   worker that hands a task back at shutdown lowers the attempt count, so the
   next attempt, on another worker, reuses the number.
3. ``deadline_exceeded``: the attempt's oldest process has run longer than the
   task's ``timeout_s`` plus ``KSI_REAPER_GRACE_S``. Process ages come from the
   process table, so a wall clock step does not shorten them.

Rule 2 cannot hit a process that is just starting. The worker writes the
record as ``running``, with the new attempt number and its pid, in one Lua
script before it starts the CLI, and the reaper reads the process table before
the records. A marked process seen by a scan therefore had its attempt
recorded as running earlier, and a record read later that shows another state
or another attempt means that attempt has ended. A record in ``queued`` or
``retrying`` owns no process: its previous attempt has ended, and its next
one has not been recorded yet, so no process can carry its marker.

When Redis is unreachable, only rule 1 applies, and the log says so once per
outage.

The reaper signals only processes that carry an orphaned marker of its own
bundle, and the members of a process group whose leader carries one (the CLI's
group, for one). It signals no process of the attempt that a live worker is
running, unless that attempt is past its deadline. Kills go through
:func:`ksi_worker.proctree.kill_marked_processes`: SIGTERM, then
``KSI_KILL_GRACE_S`` seconds later SIGKILL, each signal after a recheck of
the pid's create time and marker.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import psutil
import redis

from . import keys
from .lifecycle import TaskStatus
from .logs import configure_logging
from .presence import live_workers
from .proctree import Marker, iter_marked, kill_marked_processes
from .settings import Settings, SettingsError

# Named, not __name__, because `python -m` runs this module as __main__.
logger = logging.getLogger("ksi_worker.reaper")

#: Seconds two create times may differ and still name the same process; one
#: clock tick at the usual 100 Hz.
CREATE_TIME_TOLERANCE_S = 0.01

#: Seconds to wait for Redis to accept a connection or reply to a command.
REDIS_TIMEOUT_S = 5.0

#: Task record fields the rules read.
RECORD_FIELDS = ("status", "attempt", "worker_pid", "timeout_s")


class Reason(StrEnum):
    """Rule by which a marked process is orphaned, and the ``reason`` label."""

    WORKER_GONE = "worker_gone"
    TASK_NOT_RUNNING = "task_not_running"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class ReaperMetrics(Protocol):
    """Recorder of the reaper's scans and kills, such as Prometheus metrics."""

    def observe_scan(self, duration_s: float, orphans: int) -> None: ...

    def count_kill(self, reason: str) -> None: ...


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    name: str


@dataclass(frozen=True)
class Orphan:
    """The processes of one orphaned marker, with the rule that holds."""

    marker: Marker
    reason: Reason
    detail: str
    processes: tuple[ProcessInfo, ...]


@dataclass(frozen=True)
class Kill:
    """One process the reaper sent SIGTERM to."""

    pid: int
    name: str
    task_id: str
    attempt: int
    reason: Reason
    detail: str


@dataclass
class Scan:
    """The outcome of one scan: the orphans found and what was read."""

    orphans: list[Orphan] = field(default_factory=list)
    marked_processes: int = 0
    redis_reachable: bool = True
    duration_s: float = 0.0

    @property
    def orphaned_processes(self) -> int:
        return sum(len(orphan.processes) for orphan in self.orphans)


class Reaper:
    """Judges the marked processes of one bundle and kills the orphaned ones.

    Parameters:
      client: Redis client of the bundle's task store, with socket timeouts.
      bundle_home: The bundle's ``KSI_HOME``; markers naming another are left
        alone.
      kill_grace_s: Seconds between SIGTERM and SIGKILL.
      deadline_grace_s: Seconds a process may outlive its task's time limit.
      default_timeout_s: Time limit of a task whose record has none.
      metrics: Where scans and kills are counted; None counts nothing.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        bundle_home: str,
        kill_grace_s: float,
        deadline_grace_s: float,
        default_timeout_s: float,
        metrics: ReaperMetrics | None = None,
    ) -> None:
        self.client = client
        self.bundle_home = bundle_home
        self.kill_grace_s = kill_grace_s
        self.deadline_grace_s = deadline_grace_s
        self.default_timeout_s = default_timeout_s
        self.metrics = metrics
        self.host = socket.gethostname()
        self.redis_down = False
        # Tasks whose invalid record was logged already, to log each once.
        self.invalid_records: set[str] = set()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, metrics: ReaperMetrics | None = None
    ) -> Reaper:
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        return cls(
            client,
            bundle_home=str(settings.home),
            kill_grace_s=settings.kill_grace_s,
            deadline_grace_s=settings.reaper_grace_s,
            default_timeout_s=settings.task_timeout_s,
            metrics=metrics,
        )

    def run_once(self) -> tuple[Scan, list[Kill]]:
        """Scan once, count the scan, and kill the orphans found."""
        scan = self.scan()
        if self.metrics is not None:
            self.metrics.observe_scan(scan.duration_s, scan.orphaned_processes)
        return scan, self.kill(scan.orphans)

    def scan(self) -> Scan:
        """Find the orphaned processes of this bundle without signalling any."""
        started = time.perf_counter()
        # The process table is read before the records; the module docstring
        # explains why this order keeps a starting task's processes safe.
        by_marker: dict[Marker, list[psutil.Process]] = {}
        for process, marker in iter_marked():
            if marker.bundle_home == self.bundle_home:
                by_marker.setdefault(marker, []).append(process)
        records = self._read_records({marker.task_id for marker in by_marker})

        scan = Scan(
            marked_processes=sum(len(group) for group in by_marker.values()),
            redis_reachable=records is not None,
        )
        # Heartbeats are read at most once a scan, only when a worker pid's
        # create time differs from its marker's, and never while Redis is down.
        heartbeats: Callable[[], dict[str, dict]] = dict
        if records is not None:
            heartbeats = functools.cache(self._heartbeats)
        for marker, processes in by_marker.items():
            verdict = self._judge_worker(marker, heartbeats)
            if verdict is None and records is not None:
                try:
                    verdict = self._judge_record(marker, processes, records)
                except (TypeError, ValueError) as error:
                    if marker.task_id not in self.invalid_records:
                        logger.warning(
                            "Task %s has an invalid record (%s); its processes "
                            "are judged by their worker only.",
                            marker.task_id,
                            error,
                        )
                    self.invalid_records.add(marker.task_id)
            if verdict is not None:
                reason, detail = verdict
                described = tuple(_describe(process) for process in processes)
                scan.orphans.append(Orphan(marker, reason, detail, described))
        scan.duration_s = time.perf_counter() - started
        return scan

    def kill(self, orphans: Sequence[Orphan]) -> list[Kill]:
        """Kill every process carrying an orphaned marker, and its group."""
        by_marker = {orphan.marker: orphan for orphan in orphans}
        if not by_marker:
            return []
        signalled = kill_marked_processes(
            by_marker.__contains__, grace_s=self.kill_grace_s, leader_groups=True
        )
        kills = []
        for process in signalled:
            orphan = by_marker[process.marker]
            kill = Kill(
                pid=process.pid,
                name=process.name,
                task_id=orphan.marker.task_id,
                attempt=orphan.marker.attempt,
                reason=orphan.reason,
                detail=orphan.detail,
            )
            logger.warning(
                "Killed pid %d (%s) of task %s attempt %d: %s, %s.",
                kill.pid,
                kill.name,
                kill.task_id,
                kill.attempt,
                kill.reason.value,
                kill.detail,
            )
            if self.metrics is not None:
                self.metrics.count_kill(kill.reason.value)
            kills.append(kill)
        return kills

    def _read_records(self, task_ids: set[str]) -> dict[str, dict] | None:
        """Return the rule fields of each task, or None when Redis is down."""
        ordered = sorted(task_ids)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.ping()
            for task_id in ordered:
                pipe.hmget(keys.task(task_id), RECORD_FIELDS)
            replies = pipe.execute()[1:]
        except redis.RedisError as error:
            if not self.redis_down:
                logger.warning(
                    "Redis at %s is unreachable (%s); until it returns, only "
                    "processes of dead workers are killed.",
                    _redis_location(self.client),
                    error,
                )
            self.redis_down = True
            return None
        if self.redis_down:
            logger.info(
                "Redis at %s is reachable again; every rule applies.",
                _redis_location(self.client),
            )
        self.redis_down = False
        records = {}
        for task_id, values in zip(ordered, replies, strict=True):
            if values[0] is not None:
                records[task_id] = {
                    name: _decode_field(value)
                    for name, value in zip(RECORD_FIELDS, values, strict=True)
                }
        return records

    def _heartbeats(self) -> dict[str, dict]:
        try:
            return {worker["worker_id"]: worker for worker in live_workers(self.client)}
        except redis.RedisError:
            return {}

    def _judge_worker(
        self, marker: Marker, heartbeats: Callable[[], dict[str, dict]]
    ) -> tuple[Reason, str] | None:
        """Return the worker_gone verdict, or None while the worker lives."""
        gone = f"worker pid {marker.worker_pid} is gone"
        if marker.worker_pid <= 0:
            return Reason.WORKER_GONE, gone
        try:
            worker = psutil.Process(marker.worker_pid)
            if worker.status() == psutil.STATUS_ZOMBIE:
                return Reason.WORKER_GONE, gone
            created = worker.create_time()
        except psutil.NoSuchProcess:
            return Reason.WORKER_GONE, gone
        except psutil.AccessDenied:
            # It exists, and without its status the safe verdict is alive.
            return None
        if abs(created - marker.worker_created) <= CREATE_TIME_TOLERANCE_S:
            return None

        # Either the pid was reused or the wall clock was stepped since the
        # worker started. Only the worker's own heartbeat distinguishes them.
        heartbeat = heartbeats().get(f"{self.host}:{marker.worker_pid}", {})
        try:
            recorded = float(heartbeat.get("create_time") or 0)
        except ValueError:
            recorded = 0.0
        if abs(recorded - marker.worker_created) <= CREATE_TIME_TOLERANCE_S:
            return None
        return (
            Reason.WORKER_GONE,
            f"worker pid {marker.worker_pid} now belongs to a process started at "
            f"{created:.2f}, not {marker.worker_created:.2f}",
        )

    def _judge_record(
        self,
        marker: Marker,
        processes: Sequence[psutil.Process],
        records: dict[str, dict],
    ) -> tuple[Reason, str] | None:
        record = records.get(marker.task_id)
        if record is None:
            return Reason.TASK_NOT_RUNNING, "the task has no record in Redis"
        status = record.get("status")
        if status != TaskStatus.RUNNING.value:
            return Reason.TASK_NOT_RUNNING, f"the task is {status}"
        attempt = int(record.get("attempt") or 0)
        worker_pid = int(record.get("worker_pid") or 0)
        if attempt != marker.attempt or worker_pid != marker.worker_pid:
            return (
                Reason.TASK_NOT_RUNNING,
                f"attempt {marker.attempt} on worker pid {marker.worker_pid} was "
                f"replaced by attempt {attempt} on worker pid {worker_pid}",
            )

        timeout_s = float(record.get("timeout_s") or self.default_timeout_s)
        age_s = time.time() - _oldest_create_time(processes)
        if age_s > timeout_s + self.deadline_grace_s:
            return (
                Reason.DEADLINE_EXCEEDED,
                f"the attempt has run {age_s:.0f} s, past its time limit of "
                f"{timeout_s:g} s plus {self.deadline_grace_s:g} s of grace",
            )
        return None


def _decode_field(value: bytes | None) -> Any:
    # Record values are JSON. A value that is not stays a string, and the
    # scan judges its task as having an invalid record.
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value.decode(errors="replace")


def _oldest_create_time(processes: Sequence[psutil.Process]) -> float:
    # psutil.Process keeps the create time it read when it was built.
    return min(process.create_time() for process in processes)


def _describe(process: psutil.Process) -> ProcessInfo:
    try:
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        name = "?"
    return ProcessInfo(pid=process.pid, name=name)


def _redis_location(client: redis.Redis) -> str:
    """Name the Redis server without the password a URL may carry."""
    options = client.connection_pool.connection_kwargs
    if "path" in options:
        return f"unix:{options['path']}"
    return f"{options.get('host', '?')}:{options.get('port', '?')}"


def scan_report(scan: Scan, kills: Sequence[Kill] | None) -> dict[str, Any]:
    """Return a scan and its kills (None for a dry run) as JSON-ready data."""
    orphans = [
        {
            "pid": process.pid,
            "name": process.name,
            **asdict(orphan.marker),
            "reason": orphan.reason.value,
            "detail": orphan.detail,
        }
        for orphan in scan.orphans
        for process in orphan.processes
    ]
    report: dict[str, Any] = {
        "dry_run": kills is None,
        "redis_reachable": scan.redis_reachable,
        "marked_processes": scan.marked_processes,
        "orphans": orphans,
    }
    if kills is not None:
        report["killed"] = [
            {**asdict(kill), "reason": kill.reason.value} for kill in kills
        ]
    return report


def main() -> None:
    """Run the reaper until SIGTERM or SIGINT."""
    configure_logging()
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"reaper: invalid setting: {error}")
    # Imported here, not at the top, so that `ksi reap`, which imports this
    # module, creates no metric files.
    from .reaper_metrics import PrometheusReaperMetrics

    reaper = Reaper.from_settings(settings, metrics=PrometheusReaperMetrics())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    logger.info(
        "Reaper started for KSI_HOME %s: a scan every %g s, deadline grace %g s.",
        settings.home,
        settings.reaper_interval_s,
        settings.reaper_grace_s,
    )
    while not stopping.is_set():
        try:
            reaper.run_once()
        except Exception:
            logger.exception(
                "Reaper scan failed; the next one starts in %g s.",
                settings.reaper_interval_s,
            )
        stopping.wait(settings.reaper_interval_s)
    logger.info("Reaper stopped.")


if __name__ == "__main__":
    main()
