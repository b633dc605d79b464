"""Find and end the processes of a Claude task.

Every process the CLI starts inherits the marker variables ``KSI_TASK_ID``,
``KSI_ATTEMPT``, ``KSI_WORKER_PID``, ``KSI_WORKER_CREATED`` and
``KSI_BUNDLE_HOME``, even a tool process that left the CLI's process group, so
the marker, not the process tree, is what identifies a task's processes.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

#: Environment variables that mark a process as belonging to a task.
MARKER_TASK_ID = "KSI_TASK_ID"
MARKER_ATTEMPT = "KSI_ATTEMPT"
MARKER_WORKER_PID = "KSI_WORKER_PID"
MARKER_WORKER_CREATED = "KSI_WORKER_CREATED"
MARKER_BUNDLE_HOME = "KSI_BUNDLE_HOME"

#: Bytes that the raw environment (/proc/PID/environ) of a marked process contains.
_MARKER_BYTES = f"{MARKER_TASK_ID}=".encode()

#: Bytes asked for per read of /proc/PID/environ; most environments fit once.
_ENVIRON_READ_BYTES = 65_536

#: Seconds between two checks of whether signalled processes have ended.
_WAIT_POLL_S = 0.05

_SKIP = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


@dataclass(frozen=True)
class Marker:
    """The marker variables read from one process's environment.

    ``bundle_home`` is the ``KSI_HOME`` of the bundle whose worker started the
    task, or an empty string when the variable is missing.
    """

    task_id: str
    attempt: int
    worker_pid: int
    worker_created: float
    bundle_home: str = ""


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
            bundle_home=environ.get(MARKER_BUNDLE_HOME, ""),
        )
    except ValueError:
        return None


def _may_carry_marker(pid: int) -> bool:
    """Return False when the raw environment of ``pid`` proves it has no marker.

    A byte search of /proc/PID/environ costs a fraction of building a
    psutil.Process and parsing its environment, and almost every process on a
    host has no marker. Plain os.read skips the buffered file object, whose
    setup cost most of the remaining CPU time (bench/reaper_scan.py). Where
    /proc cannot be read this way it returns True.
    """
    if not psutil.LINUX:
        return True
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY)
    except OSError:
        # Exited, or another user's process.
        return False
    try:
        chunks = []
        while chunk := os.read(fd, _ENVIRON_READ_BYTES):
            chunks.append(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _MARKER_BYTES in b"".join(chunks)


def iter_marked() -> Iterator[tuple[psutil.Process, Marker]]:
    """Yield every live process that carries a marker, with its marker."""
    own_pid = os.getpid()
    for pid in psutil.pids():
        if pid == own_pid or not _may_carry_marker(pid):
            continue
        try:
            process = psutil.Process(pid)
            marker = read_marker(process)
        except _SKIP:
            continue
        if marker is not None:
            yield process, marker


def find_task_processes(task_id: str) -> list[psutil.Process]:
    return [proc for proc, marker in iter_marked() if marker.task_id == task_id]


@dataclass(frozen=True)
class SignalledProcess:
    """A marked process that was sent SIGTERM, alone or with its process group."""

    pid: int
    name: str
    marker: Marker


@dataclass(frozen=True)
class _Target:
    process: psutil.Process
    marker: Marker
    name: str
    pgid: int


def _find_targets(accept: Callable[[Marker], bool], exclude: set[int]) -> list[_Target]:
    targets = []
    for process, marker in iter_marked():
        if process.pid in exclude or not accept(marker):
            continue
        try:
            name = process.name()
            pgid = os.getpgid(process.pid)
        except (*_SKIP, ProcessLookupError):
            continue
        targets.append(_Target(process, marker, name, pgid))
    return targets


def _skip_reason(
    process: psutil.Process, accept: Callable[[Marker], bool]
) -> str | None:
    """Return why ``process`` must be skipped now, or None if it may be signalled.

    Called right before every signal: the pid must still belong to the process
    found (same create time) and that process must still carry an accepted
    marker.
    """
    try:
        if not process.is_running():
            if psutil.pid_exists(process.pid):
                return "its pid now belongs to another process"
            return "exited"
        if process.status() == psutil.STATUS_ZOMBIE:
            return "exited"
        marker = read_marker(process)
    except psutil.NoSuchProcess:
        return "exited"
    except psutil.AccessDenied:
        return "its status can no longer be read"
    if marker is None or not accept(marker):
        return "it no longer carries a matching marker"
    return None


def _send(
    target: _Target,
    sig: int,
    accept: Callable[[Marker], bool],
    *,
    whole_group: bool,
) -> bool:
    """Send ``sig`` to the target, or to the group it leads, after a recheck."""
    reason = _skip_reason(target.process, accept)
    if reason is not None:
        logger.log(
            logging.DEBUG if reason == "exited" else logging.INFO,
            "Skipped %s to %s %d of task %s: %s.",
            signal.Signals(sig).name,
            "process group" if whole_group else "pid",
            target.process.pid,
            target.marker.task_id,
            reason,
        )
        return False
    try:
        if whole_group:
            os.killpg(target.process.pid, sig)
        else:
            # psutil checks again that the pid was not reused.
            target.process.send_signal(sig)
    except (*_SKIP, ProcessLookupError, PermissionError):
        return False
    return True


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_ended(
    processes: Iterable[psutil.Process], timeout_s: float
) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for the processes to end; return those still running.

    A zombie counts as ended: it runs nothing, and only its parent can remove
    it. The processes are not reaped here, so a caller's own child keeps its
    exit status for the caller.
    """
    deadline = time.monotonic() + timeout_s
    running = list(processes)
    while True:
        running = [process for process in running if _is_running(process)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(_WAIT_POLL_S)


def kill_marked_processes(
    accept: Callable[[Marker], bool],
    *,
    grace_s: float,
    process_group: int | None = None,
    leader_groups: bool = False,
    exclude: Iterable[int] = (),
) -> list[SignalledProcess]:
    """End every process whose marker ``accept`` returns True for.

    Each gets SIGTERM, then SIGKILL if it still runs ``grace_s`` seconds later.
    Every signal follows a recheck of the pid's create time and marker, and a
    skipped signal is logged when the pid changed hands.

    ``process_group`` is signalled as a whole without a check, for a caller
    that vouches for it, such as the runner, whose unreaped child leads it.
    With ``leader_groups``, every accepted process that leads its process group
    has the whole group signalled, after the same recheck of that leader, so a
    member that cleared its environment gets the signal too. ``exclude`` lists
    pids the caller waits for itself, such as its own child.

    Returns the accepted processes that were sent SIGTERM.
    """
    targets = _find_targets(accept, set(exclude))
    if process_group is not None:
        _killpg_unchecked(process_group, signal.SIGTERM)
    if not targets:
        return []

    signalled: dict[int, _Target] = {}
    leaders = []
    if leader_groups:
        for leader in targets:
            if leader.pgid != leader.process.pid:
                continue
            if _send(leader, signal.SIGTERM, accept, whole_group=True):
                leaders.append(leader)
                for member in targets:
                    if member.pgid == leader.pgid:
                        signalled.setdefault(member.process.pid, member)
    for target in targets:
        if target.process.pid in signalled:
            continue
        if _send(target, signal.SIGTERM, accept, whole_group=False):
            signalled[target.process.pid] = target

    running = _wait_ended([target.process for target in signalled.values()], grace_s)
    if process_group is not None:
        _killpg_unchecked(process_group, signal.SIGKILL)
    # NOTE: a group whose leader has exited is not signalled again, so a
    # member without a marker that ignores SIGTERM outlives it.
    for leader in leaders:
        if _is_running(leader.process):
            _send(leader, signal.SIGKILL, accept, whole_group=True)
    if running:
        killed = [
            signalled[process.pid]
            for process in running
            if _send(signalled[process.pid], signal.SIGKILL, accept, whole_group=False)
        ]
        _wait_ended([target.process for target in killed], 2)
        for target in killed:
            logger.warning(
                "Pid %d (%s) of task %s outlived SIGTERM for %.1f s and got SIGKILL.",
                target.process.pid,
                target.name,
                target.marker.task_id,
                grace_s,
            )
    return [
        SignalledProcess(pid=pid, name=target.name, marker=target.marker)
        for pid, target in signalled.items()
    ]


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
    so that its exit status stays the caller's to collect.
    Returns the pids that received a signal.
    """
    signalled = kill_marked_processes(
        lambda marker: marker.task_id == task_id,
        grace_s=grace_s,
        process_group=process_group,
        exclude=exclude,
    )
    return [process.pid for process in signalled]


def _killpg_unchecked(process_group: int, sig: int) -> None:
    try:
        os.killpg(process_group, sig)
    except (ProcessLookupError, PermissionError):
        pass
