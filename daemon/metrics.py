"""Metrics of the daemon: open connections and requests by command and result.

Recorded into prometheus-client's multiprocess folder when
``PROMETHEUS_MULTIPROC_DIR`` is set (the bundle sets it), and summed by the
``metrics`` program.
"""

from __future__ import annotations

from collections.abc import Container

from prometheus_client import Counter, Gauge

#: Command label of a request whose command is missing or not in the table,
#: so that arbitrary client input never becomes a label value.
UNKNOWN_COMMAND = "unknown"

#: Result label of a request that succeeded; failures carry their error code.
OK = "ok"

CONNECTIONS = Gauge(
    "ksi_daemon_connections",
    "Client connections open on the daemon's socket.",
    multiprocess_mode="livesum",
)
COMMANDS = Counter(
    "ksi_daemon_commands",
    "Requests handled by the daemon, by command and result (ok or the error code).",
    ["command", "result"],
)


def count_command(command: str | None, known: Container[str], result: str) -> None:
    """Count one request; ``result`` is ``ok`` or the reply's error code."""
    label = command if command is not None and command in known else UNKNOWN_COMMAND
    COMMANDS.labels(label, result).inc()
