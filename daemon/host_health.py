"""Health checks of the daemon's host: the Claude CLI and supervisord's programs.

HEALTH_CHECK runs them beside its Redis checks, so a broken setup shows in
``ksi health`` even while Redis is down. They find a ``KSI_CLAUDE_BIN`` that
does not exist, and a ``ksi:*`` program that supervisord gave up on
(``FATAL``), such as a metrics program whose ``KSI_METRICS_ADDR`` is taken.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import xmlrpc.client
from pathlib import Path

logger = logging.getLogger(__name__)

# The last error of a supervisord read, so a lasting one is logged once.
_last_supervisor_error = ""

#: Seconds to wait for supervisord's reply before the check is skipped.
SUPERVISOR_TIMEOUT_S = 2.0

#: supervisord states of a ``ksi:*`` program that HEALTH_CHECK reports.
#: STARTING and STOPPING are left out because a restart passes through them.
PROBLEM_STATES = frozenset({"FATAL", "BACKOFF", "EXITED", "STOPPED", "UNKNOWN"})


def claude_cli_problem(claude_bin: str) -> str | None:
    """Describe why the configured Claude CLI cannot run, or return None."""
    if shutil.which(claude_bin) is not None:
        return None
    fix = "set KSI_CLAUDE_BIN to the claude executable or run scripts/setup"
    if os.path.sep in claude_bin and os.path.isfile(claude_bin):
        return f"Claude CLI KSI_CLAUDE_BIN={claude_bin} is not executable; {fix}"
    return f"Claude CLI KSI_CLAUDE_BIN={claude_bin} was not found; {fix}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket, with a timeout."""

    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self.socket_path, self.timeout_s)


def supervisor_problems(socket_path: Path, *, group: str = "ksi") -> list[str]:
    """Describe each program of ``group`` that is not running or starting.

    Returns no problem when supervisord's socket is missing, as for a daemon
    started outside supervisord, or when supervisord does not reply in time.
    """
    if not socket_path.exists():
        return []
    proxy = xmlrpc.client.ServerProxy(
        "http://localhost",
        transport=_UnixTransport(socket_path, SUPERVISOR_TIMEOUT_S),
    )
    global _last_supervisor_error
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error) as error:
        if str(error) != _last_supervisor_error:
            logger.warning(
                "Cannot read program states from supervisord at %s (%s); "
                "HEALTH_CHECK leaves them out until it can.",
                socket_path,
                error,
            )
        _last_supervisor_error = str(error)
        return []
    _last_supervisor_error = ""
    problems = []
    for info in infos:
        if info["group"] != group or info["statename"] not in PROBLEM_STATES:
            continue
        name = f"{group}:{info['name']}"
        problems.append(
            f"program {name} is {info['statename']}; read {info['stdout_logfile']} "
            f"and start it with `ksi-supervisorctl start {name}`"
        )
    return problems
