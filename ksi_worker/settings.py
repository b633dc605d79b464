"""Bundle settings, read once from ``KSI_*`` environment variables.

Every program of the ``ksi:*`` group reads the same variables, because
supervisord passes its environment through to each program. The README lists
each variable with its unit and default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

#: Project root: the folder holding pyproject.toml and node_modules.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Upper bound on any task's time limit, in seconds (24 hours).
MAX_TASK_TIMEOUT_S = 86_400

#: Dramatiq queue that carries Claude tasks.
DEFAULT_QUEUE = "claude"


class SettingsError(ValueError):
    """An environment variable contains a value the bundle cannot use."""


def _env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below the minimum {minimum}")
    return value


def _env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below the minimum {minimum}")
    return value


def _default_claude_bin() -> str:
    pinned = PROJECT_ROOT / "node_modules" / ".bin" / "claude"
    return str(pinned) if pinned.exists() else "claude"


@dataclass(frozen=True)
class Settings:
    """Settings shared by the daemon, the workers and the ``ksi`` client.

    Parameters:
      home: Runtime folder (``KSI_HOME``, default ``./var``). Sockets, logs,
        Redis data and task work folders all live under it.
      redis_url: Broker and store (``KSI_REDIS_URL``). Default: the bundle's
        own Redis on the unix socket ``KSI_HOME/run/redis.sock``.
      workers: Worker processes under supervisord (``KSI_WORKERS``, default 2).
      worker_threads: Threads per worker process (``KSI_WORKER_THREADS``,
        default 1). Each running CLI uses about 290 MB.
      claude_bin: Claude CLI executable (``KSI_CLAUDE_BIN``, default the pinned
        one in ``node_modules``).
      model: Default model of a task (``KSI_MODEL``, default ``sonnet``).
      task_timeout_s: Default time limit of a task in seconds
        (``KSI_TASK_TIMEOUT_S``, default 600).
      idle_timeout_s: Default no-output limit of a task: seconds without a
        line from the CLI after which it is killed and the task ends
        ``timed_out`` (``KSI_IDLE_TIMEOUT_S``, default 360). It sits above
        ``api_timeout_s`` so that a request timeout is reported by the CLI,
        as a retryable error, before this limit ends the task.
      api_timeout_s: Per-request timeout passed to the CLI as
        ``API_TIMEOUT_MS`` (``KSI_API_TIMEOUT_S``, default 300).
      kill_grace_s: Seconds between SIGTERM and SIGKILL when a task's process
        tree is ended (``KSI_KILL_GRACE_S``, default 5).
      metrics_addr: ``host:port`` of the metrics endpoint
        (``KSI_METRICS_ADDR``, default ``127.0.0.1:9870``).
      queue: Dramatiq queue name (``KSI_QUEUE``, default ``claude``).
      events_maxlen: Approximate bound on the event stream's length
        (``KSI_EVENTS_MAXLEN``, default 100000 events).
      max_retries: Retries of a task after a retryable failure
        (``KSI_MAX_RETRIES``, default 3).
      retry_min_backoff_s: First retry delay in seconds
        (``KSI_RETRY_MIN_BACKOFF_S``, default 30). Later delays double, with
        jitter.
      retry_max_backoff_s: Cap on a retry delay in seconds
        (``KSI_RETRY_MAX_BACKOFF_S``, default 600).
      stop_wait_s: Seconds supervisord waits for a stopping worker before
        SIGKILL (``KSI_STOP_WAIT_S``, default 60). Running tasks may finish
        within this window less ``kill_grace_s`` and 10 s; later they are
        killed and handed back to the queue.
      broker_heartbeat_timeout_s: Seconds without a heartbeat after which
        Dramatiq counts a worker as dead and returns its unacknowledged
        messages to the queue (``KSI_BROKER_HEARTBEAT_TIMEOUT_S``, default 15).
      broker_maintenance_interval_s: Longest gap between two passes that
        return a dead worker's messages (``KSI_BROKER_MAINTENANCE_S``,
        default 5).
      budget_usd_per_hour: Spend limit of the bundle, summed from the CLI's
        ``total_cost_usd`` over the last hour; past it, tasks wait in the
        queue (``KSI_BUDGET_USD_PER_HOUR``, default 0: no limit).
      agent_starts_per_minute: Task starts allowed per ``agent_id`` per
        minute; past it, that agent's tasks wait in the queue
        (``KSI_AGENT_STARTS_PER_MINUTE``, default 0: no limit).
      worker_poll_ms: Longest pause of an idle worker between queue polls, in
        milliseconds (``KSI_WORKER_POLL_MS``, default 1000).
      max_queued: Most tasks waiting in the queue (ready plus delayed) before
        QUEUE_TASK is rejected with QUEUE_FULL (``KSI_MAX_QUEUED``, default
        10000).
      socket_group: Group given read and write access to the daemon socket
        (mode 0660) and passage through ``KSI_HOME/run`` (``KSI_SOCKET_GROUP``,
        default none: socket mode 0600).
      reaper_interval_s: Seconds between two scans of the reaper
        (``KSI_REAPER_INTERVAL_S``, default 10).
      reaper_grace_s: Seconds a task's process may outlive the task's time
        limit before the reaper kills it (``KSI_REAPER_GRACE_S``, default 60).
    """

    home: Path
    redis_url: str
    workers: int
    worker_threads: int
    claude_bin: str
    model: str
    task_timeout_s: int
    idle_timeout_s: float
    api_timeout_s: int
    kill_grace_s: float
    metrics_addr: str
    queue: str
    events_maxlen: int
    max_retries: int
    retry_min_backoff_s: float
    retry_max_backoff_s: float
    stop_wait_s: int
    broker_heartbeat_timeout_s: float
    broker_maintenance_interval_s: float
    budget_usd_per_hour: float
    agent_starts_per_minute: int
    worker_poll_ms: int
    max_queued: int
    socket_group: str | None
    reaper_interval_s: float
    reaper_grace_s: float

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("KSI_HOME") or "var").resolve()
        task_timeout_s = _env_int("KSI_TASK_TIMEOUT_S", 600, minimum=1)
        if task_timeout_s > MAX_TASK_TIMEOUT_S:
            raise SettingsError(
                f"KSI_TASK_TIMEOUT_S={task_timeout_s} is above the maximum "
                f"{MAX_TASK_TIMEOUT_S} seconds"
            )
        return cls(
            home=home,
            redis_url=os.environ.get("KSI_REDIS_URL") or default_redis_url(home),
            workers=_env_int("KSI_WORKERS", 2, minimum=1),
            worker_threads=_env_int("KSI_WORKER_THREADS", 1, minimum=1),
            claude_bin=os.environ.get("KSI_CLAUDE_BIN") or _default_claude_bin(),
            model=os.environ.get("KSI_MODEL") or "sonnet",
            task_timeout_s=task_timeout_s,
            idle_timeout_s=_env_float("KSI_IDLE_TIMEOUT_S", 360.0, minimum=1.0),
            api_timeout_s=_env_int("KSI_API_TIMEOUT_S", 300, minimum=1),
            kill_grace_s=_env_float("KSI_KILL_GRACE_S", 5.0),
            metrics_addr=os.environ.get("KSI_METRICS_ADDR") or "127.0.0.1:9870",
            queue=os.environ.get("KSI_QUEUE") or DEFAULT_QUEUE,
            events_maxlen=_env_int("KSI_EVENTS_MAXLEN", 100_000, minimum=100),
            max_retries=_env_int("KSI_MAX_RETRIES", 3),
            retry_min_backoff_s=_env_float("KSI_RETRY_MIN_BACKOFF_S", 30.0),
            retry_max_backoff_s=_env_float("KSI_RETRY_MAX_BACKOFF_S", 600.0),
            stop_wait_s=_env_int("KSI_STOP_WAIT_S", 60, minimum=15),
            broker_heartbeat_timeout_s=_env_float(
                "KSI_BROKER_HEARTBEAT_TIMEOUT_S", 15.0, minimum=3.0
            ),
            broker_maintenance_interval_s=_env_float(
                "KSI_BROKER_MAINTENANCE_S", 5.0, minimum=0.1
            ),
            budget_usd_per_hour=_env_float("KSI_BUDGET_USD_PER_HOUR", 0.0),
            agent_starts_per_minute=_env_int("KSI_AGENT_STARTS_PER_MINUTE", 0),
            worker_poll_ms=_env_int("KSI_WORKER_POLL_MS", 1000, minimum=10),
            max_queued=_env_int("KSI_MAX_QUEUED", 10_000, minimum=1),
            socket_group=os.environ.get("KSI_SOCKET_GROUP") or None,
            reaper_interval_s=_env_float("KSI_REAPER_INTERVAL_S", 10.0, minimum=0.1),
            reaper_grace_s=_env_float("KSI_REAPER_GRACE_S", 60.0),
        )

    @property
    def drain_s(self) -> float:
        """Seconds a stopping worker lets running tasks go on."""
        return max(0.0, self.stop_wait_s - self.kill_grace_s - 10)

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def prometheus_dir(self) -> Path:
        """prometheus-client's multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``)."""
        return self.home / "prometheus"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def tasks_dir(self) -> Path:
        return self.home / "tasks"

    @property
    def claude_home(self) -> Path:
        """``HOME`` and ``CLAUDE_CONFIG_DIR`` parent of every CLI run."""
        return self.home / "claude"

    @property
    def daemon_socket(self) -> Path:
        return self.run_dir / "ksi.sock"


def redis_password_file(home: Path) -> Path:
    """Return the file holding the bundle's Redis password (mode 0600)."""
    return home / "secrets" / "redis.password"


def default_redis_url(home: Path) -> str:
    """Return the URL of the bundle's own Redis on its unix socket.

    The password comes from ``redis_password_file``, which ``ksi-supervisord``
    creates on first start; it is never passed on a command line.
    """
    socket_path = quote(str(home / "run" / "redis.sock"))
    try:
        password = redis_password_file(home).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        # NotADirectoryError: KSI_HOME or a folder in it is a file, which
        # ksi-supervisord reports when it creates the runtime folders.
        return f"unix://{socket_path}?db=0"
    return f"unix://:{quote(password, safe='')}@{socket_path}?db=0"


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
