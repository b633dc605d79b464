"""Helpers of the fault tests: supervisord's view of a bundle, and its workers.

Program states are read over supervisord's XML-RPC interface on
``KSI_HOME/run/supervisor.sock``, which costs a few milliseconds, where
``supervisorctl status`` starts a Python interpreter each time.
"""

from __future__ import annotations

import threading
import time
import xmlrpc.client
from collections import Counter
from pathlib import Path

import psutil
from supervisor.xmlrpc import SupervisorTransport

#: supervisord states that mean a program will not come back by itself.
GIVEN_UP = frozenset({"FATAL"})


def supervisor_proxy(home: Path) -> xmlrpc.client.ServerProxy:
    """Return an XML-RPC proxy of the supervisord that runs the bundle in home."""
    socket_url = f"unix://{home / 'run' / 'supervisor.sock'}"
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, socket_url)
    )


def program_infos(home: Path) -> dict[str, dict]:
    """Return supervisord's process info of each program, by ``group:name``."""
    infos = supervisor_proxy(home).supervisor.getAllProcessInfo()
    return {f"{info['group']}:{info['name']}": info for info in infos}


def program_pids(home: Path, prefix: str = "ksi:") -> dict[str, int]:
    """Return the pid of each running program whose name starts with prefix."""
    return {
        name: info["pid"]
        for name, info in program_infos(home).items()
        if name.startswith(prefix) and info["pid"]
    }


def dramatiq_child(program_pid: int) -> psutil.Process | None:
    """Return the Dramatiq worker process forked by a worker program, if any.

    The program's own process is Dramatiq's parent, which runs no task. Its
    one child (``--processes 1``) runs the actor, and the CLIs are children of
    that child.
    """
    try:
        children = psutil.Process(program_pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0] if children else None


class StateRecorder:
    """Poll supervisord every ``interval_s`` and remember every state seen.

    Parameters:
      home: KSI_HOME of the bundle.
      interval_s: Seconds between two polls.
    """

    def __init__(self, home: Path, *, interval_s: float = 0.5) -> None:
        self.home = home
        self.interval_s = interval_s
        self.seen: dict[str, Counter[str]] = {}
        # (seconds since start, program, state) of every poll that found a
        # program given up by supervisord.
        self.given_up: list[tuple[float, str, str]] = []
        self.polls = 0
        self.failed_polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> StateRecorder:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def states_of(self, program: str) -> set[str]:
        return set(self.seen.get(program, {}))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                infos = program_infos(self.home)
            except (OSError, xmlrpc.client.Error):
                # supervisord is still starting or already gone.
                self.failed_polls += 1
            else:
                self.polls += 1
                elapsed = time.monotonic() - self._started
                for name, info in infos.items():
                    state = info["statename"]
                    self.seen.setdefault(name, Counter())[state] += 1
                    if state in GIVEN_UP:
                        self.given_up.append((round(elapsed, 1), name, state))
            self._stop.wait(self.interval_s)
