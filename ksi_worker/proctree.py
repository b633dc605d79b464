"""Find and end the processes of a Claude task.

Every process the CLI starts inherits the marker variables ``KSI_TASK_ID``,
``KSI_ATTEMPT``, ``KSI_WORKER_PID`` and ``KSI_WORKER_CREATED``, even a tool
process that left the CLI's process group, so the marker, not the process
tree, is what identifies a task's processes.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

#: Environment variables that mark a process as belonging to a task.
MARKER_TASK_ID = "KSI_TASK_ID"
MARKER_ATTEMPT = "KSI_ATTEMPT"
MARKER_WORKER_PID = "KSI_WORKER_PID"
MARKER_WORKER_CREATED = "KSI_WORKER_CREATED"

_SKIP = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


@dataclass(frozen=True)
class Marker:
    """The marker variables read from one process's environment."""

    task_id: str
    attempt: int
    worker_pid: int
    worker_created: float


def read_marker(process: psutil.Process) -> Marker | None:
    """Return the process's marker, or None if it has none or cannot be read.

    Raises psutil.NoSuchProcess when the process exits meanwhile.
    """
    try:
        environ = process.environ()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return None
    task_id = environ.get(MARKER_TASK_ID)
    if not task_id:
        return None
    try:
        return Marker(
            task_id=task_id,
            attempt=int(environ.get(MARKER_ATTEMPT) or 0),
            worker_pid=int(environ.get(MARKER_WORKER_PID) or 0),
            worker_created=float(environ.get(MARKER_WORKER_CREATED) or 0),
        )
    except ValueError:
        return None


def iter_marked() -> Iterator[tuple[psutil.Process, Marker]]:
    """Yield every live process that carries a marker, with its marker."""
    own_pid = os.getpid()
    for process in psutil.process_iter():
        if process.pid == own_pid:
            continue
        try:
            marker = read_marker(process)
        except _SKIP:
            continue
        if marker is not None:
            yield process, marker


def find_task_processes(task_id: str) -> list[psutil.Process]:
    return [proc for proc, marker in iter_marked() if marker.task_id == task_id]


def _still_marked(process: psutil.Process, task_id: str) -> bool:
    """Check right before a signal that the pid still is the process we found."""
    try:
        if not process.is_running():
            return False
        marker = read_marker(process)
    except _SKIP:
        return False
    return marker is not None and marker.task_id == task_id


def _signal_all(
    processes: Iterable[psutil.Process], sig: int, task_id: str
) -> list[psutil.Process]:
    signalled = []
    for process in processes:
        if not _still_marked(process, task_id):
            logger.info(
                "Skipped signal %s to pid %d of task %s: it exited or its pid "
                "now belongs to another process.",
                signal.Signals(sig).name,
                process.pid,
                task_id,
            )
            continue
        try:
            process.send_signal(sig)
        except _SKIP:
            continue
        signalled.append(process)
    return signalled


def kill_task_processes(
    task_id: str,
    *,
    grace_s: float,
    process_group: int | None = None,
    exclude: Iterable[int] = (),
) -> list[int]:
    """End every process of a task: SIGTERM, wait ``grace_s``, then SIGKILL.

    ``process_group`` is the CLI's process group, signalled as a whole too so
    that a process that cleared its environment still gets the signal.
    ``exclude`` lists pids the caller waits for itself, such as its own child,
    which a wait here would reap and so hide its exit status from the caller.
    Returns the pids that received a signal.
    """
    skipped = set(exclude)
    found = {
        proc.pid: proc
        for proc in find_task_processes(task_id)
        if proc.pid not in skipped
    }
    if process_group is not None:
        try:
            os.killpg(process_group, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    if not found:
        return []

    signalled = _signal_all(found.values(), signal.SIGTERM, task_id)
    _, alive = psutil.wait_procs(signalled, timeout=grace_s)
    if process_group is not None:
        try:
            os.killpg(process_group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if alive:
        killed = _signal_all(alive, signal.SIGKILL, task_id)
        psutil.wait_procs(killed, timeout=2)
        logger.warning(
            "Task %s: pids %s outlived SIGTERM for %.1f s and were killed.",
            task_id,
            [proc.pid for proc in killed],
            grace_s,
        )
    return [proc.pid for proc in signalled]
