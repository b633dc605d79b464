"""One attempt of a Claude task: from its record in Redis to its next state."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.common import compute_backoff

from . import keys
from .claude_result import Outcome, decide
from .drain import ShutdownDrain
from .lifecycle import TERMINAL_EVENTS, EventType, TaskStatus
from .presence import worker_id_of, worker_identity
from .proctree import (
    MARKER_ATTEMPT,
    MARKER_BUNDLE_HOME,
    MARKER_TASK_ID,
    MARKER_WORKER_CREATED,
    MARKER_WORKER_PID,
)
from .progress import ProgressReporter
from .runner import ClaudeRun, child_environment, run_claude
from .settings import Settings
from .store import TaskStore
from .throttle import record_spend, throttle_reason

logger = logging.getLogger(__name__)

#: Seconds between two reads of a running task's cancel flag.
CANCEL_CHECK_INTERVAL_S = 0.5

STARTABLE = (TaskStatus.QUEUED, TaskStatus.RETRYING, TaskStatus.RUNNING)


class PermanentTaskError(Exception):
    """A task failed for good; Dramatiq moves its message to the dead letters."""


def task_folder(settings: Settings, task_id: str) -> Path:
    return settings.tasks_dir / task_id


def _make_folders(folder: Path) -> None:
    for path in (folder, folder / "work", folder / "home", folder / "tmp"):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


def build_argv(settings: Settings, record: dict[str, Any]) -> list[str]:
    argv = [
        settings.claude_bin,
        "--model",
        record.get("model") or settings.model,
        "--print",
        "--output-format",
        "stream-json",
        "--verbose",
    ]
    if record.get("session_id"):
        argv += ["--resume", record["session_id"]]
    if record.get("allowed_tools"):
        argv += ["--allowedTools", ",".join(record["allowed_tools"])]
    return argv


def build_env(
    settings: Settings, task_id: str, attempt: int, folder: Path
) -> dict[str, str]:
    identity = worker_identity()
    home = folder / "home"
    return child_environment(
        os.environ,
        {
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "CLAUDE_CODE_TMPDIR": str(folder / "tmp"),
            "TMPDIR": str(folder / "tmp"),
            # The bundle owns the retry policy, so the CLI must not retry on
            # its own for minutes, and its per-request timeout is ours.
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "API_TIMEOUT_MS": str(settings.api_timeout_s * 1000),
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            MARKER_TASK_ID: task_id,
            MARKER_ATTEMPT: str(attempt),
            MARKER_WORKER_PID: str(identity["pid"]),
            MARKER_WORKER_CREATED: repr(identity["create_time"]),
            # Bundles side by side see each other's processes; the reaper
            # judges only those of its own bundle.
            MARKER_BUNDLE_HOME: str(settings.home),
        },
    )


class TaskAttempt:
    """Runs one delivery of an ``execute_claude_task`` message.

    Parameters:
      settings: Bundle settings.
      store: Task store on the bundle's Redis.
      task_id: Id of the task to run.
      drain: The worker's shutdown drain, which ends the task when the
        worker stops; None outside a worker.
    """

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        task_id: str,
        *,
        drain: ShutdownDrain | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.task_id = task_id
        self.drain = drain
        self._next_cancel_check = 0.0

    def run(self) -> None:
        record = self.store.get(self.task_id)
        if record is None:
            logger.error(
                "Task %s has no record in Redis; message dropped.", self.task_id
            )
            return
        status = TaskStatus(record["status"])
        if status.is_terminal:
            logger.info(
                "Task %s already ended %s; message skipped.", self.task_id, status
            )
            return

        # Attempts are counted in the record, which survives a worker crash,
        # because Dramatiq redelivers a dead worker's message without counting
        # a retry: a task that kills its worker every time must still end.
        attempt_limit = self._attempt_limit(record)
        if int(record.get("attempt") or 0) >= attempt_limit:
            self._fail_for_good(
                "attempts_exhausted",
                f"attempts_exhausted: {record.get('attempt')} attempts started and "
                f"none finished; the limit is {attempt_limit}",
            )

        throttled = self.throttle(record)
        if throttled is not None:
            reason, delay_s = throttled
            self.store.set_fields(self.task_id, {"waiting_reason": reason})
            logger.info(
                "Task %s waits %.0f s in the queue: %s.", self.task_id, delay_s, reason
            )
            raise dramatiq.Retry(delay=int(delay_s * 1000))

        folder = self._folder(record)
        _make_folders(folder)
        identity = worker_identity()
        applied, before, attempt = self.store.transition(
            self.task_id,
            allowed_from=STARTABLE,
            fields={
                "status": TaskStatus.RUNNING.value,
                "started_at": time.time(),
                "worker_pid": identity["pid"],
                "worker_created": identity["create_time"],
                "worker_host": identity["host"],
                "worker_id": worker_id_of(identity),
                "folder": str(folder),
                "cancel_requested": False,
                "waiting_reason": None,
                # An error of an earlier attempt no longer describes the task.
                "error": None,
                "error_class": None,
            },
            event_type=EventType.TASK_STARTED,
            payload={"worker_id": worker_id_of(identity)},
            new_attempt=True,
        )
        if not applied:
            logger.info("Task %s is %s; not started.", self.task_id, before)
            return
        logger.info(
            "Task %s attempt %d started on worker pid %d.",
            self.task_id,
            attempt,
            os.getpid(),
        )

        prompt = self.store.get_prompt(self.task_id) or ""
        timeout_s = float(record.get("timeout_s") or self.settings.task_timeout_s)
        claude_run = run_claude(
            build_argv(self.settings, record),
            prompt,
            task_id=self.task_id,
            cwd=folder / "work",
            env=build_env(self.settings, self.task_id, attempt, folder),
            timeout_s=timeout_s,
            kill_grace_s=self.settings.kill_grace_s,
            should_stop=self._should_stop,
            on_line=ProgressReporter(self.store, self.task_id, attempt).on_line,
            idle_timeout_s=float(
                record.get("idle_timeout_s") or self.settings.idle_timeout_s
            ),
        )
        if claude_run.stopped_by == "shutdown":
            self._hand_back(attempt)
            raise dramatiq.Retry(delay=0)
        self._finish(record, attempt, claude_run, timeout_s)

    def _folder(self, record: dict[str, Any]) -> Path:
        # A resumed session must run in the folder of the task that created
        # it, because the CLI finds sessions by config folder and cwd.
        session_id = record.get("session_id")
        if session_id:
            folder = self.store.client.get(keys.session(session_id))
            if folder:
                return Path(folder.decode())
        return task_folder(self.settings, self.task_id)

    def _max_retries(self, record: dict[str, Any]) -> int:
        value = record.get("max_retries")
        return self.settings.max_retries if value is None else int(value)

    def _attempt_limit(self, record: dict[str, Any]) -> int:
        """Return the attempt number past which the task is dead-lettered.

        A replayed dead letter keeps its attempt count and gets a fresh budget
        of retries on top of it (``attempt_limit`` in its record).
        """
        limit = record.get("attempt_limit")
        return int(limit) if limit else self._max_retries(record) + 1

    def throttle(self, record: dict[str, Any]) -> tuple[str, float] | None:
        """Return why and how long a task must wait before it starts, if so."""
        return throttle_reason(self.settings, self.store.client, record)

    def _should_stop(self) -> str | None:
        if self.drain is not None and self.drain.drain_expired():
            return "shutdown"
        now = time.monotonic()
        if now < self._next_cancel_check:
            return None
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL_S
        try:
            raw = self.store.client.hget(keys.task(self.task_id), "cancel_requested")
        except redis.RedisError as error:
            # A cancel can wait for Redis; the running task must not fail.
            logger.warning(
                "Task %s: cannot read its cancel flag (%s); checking again later.",
                self.task_id,
                error,
            )
            return None
        return "cancel" if raw == b"true" else None

    def _finish(
        self,
        record: dict[str, Any],
        attempt: int,
        claude_run: ClaudeRun,
        timeout_s: float,
    ) -> None:
        common = {
            "finished_at": time.time(),
            "elapsed_s": round(claude_run.elapsed_s, 3),
            "exit_code": claude_run.returncode,
        }
        if claude_run.stopped_by == "cancel":
            reason = "cancelled by request while running"
            self._end(
                TaskStatus.CANCELLED,
                {**common, "error": reason, "error_class": "cancelled"},
                {"reason": reason},
            )
            return
        if claude_run.stopped_by in ("timeout", "idle_timeout"):
            message = (
                f"timed_out: claude ran past the time limit of {timeout_s:g} s "
                f"and was killed after {claude_run.elapsed_s:.1f} s"
            )
            if claude_run.stopped_by == "idle_timeout":
                idle_s = record.get("idle_timeout_s") or self.settings.idle_timeout_s
                message = (
                    f"timed_out: claude printed no output for {idle_s:g} s "
                    f"(idle_timeout_s) and was killed after "
                    f"{claude_run.elapsed_s:.1f} s"
                )
            retries_left = self._attempt_limit(record) - attempt
            if record.get("retry_on_timeout") and retries_left > 0:
                timed_out = Outcome(
                    succeeded=False,
                    retryable=True,
                    error_class="timed_out",
                    message=message,
                )
                self._retry(timed_out, attempt, common, record)
                return
            self._end(
                TaskStatus.TIMED_OUT,
                {**common, "error": message, "error_class": "timed_out"},
                {"error": message, "error_class": "timed_out"},
            )
            return
        if claude_run.launch_error:
            self._fail_for_good(
                "claude_missing",
                f"claude_missing: cannot start the Claude CLI "
                f"({claude_run.launch_error}); set KSI_CLAUDE_BIN or run "
                f"scripts/setup",
                common,
            )

        outcome = decide(
            returncode=claude_run.returncode,
            stdout=claude_run.stdout,
            stderr_tail=claude_run.stderr_tail,
        )
        cost = outcome.result.get("total_cost_usd")
        if isinstance(cost, int | float) and cost > 0:
            record_spend(self.store.client, float(cost))
        if outcome.succeeded:
            self._succeed(outcome, common, record)
            return
        retries_left = self._attempt_limit(record) - attempt
        if outcome.retryable and retries_left > 0:
            self._retry(outcome, attempt, common, record)
            return
        fields = {
            **common,
            **_result_fields(outcome.result),
            "http_status": outcome.http_status,
        }
        self._fail_for_good(outcome.error_class or "failed", outcome.message, fields)

    def _succeed(
        self, outcome: Outcome, common: dict[str, Any], record: dict[str, Any]
    ) -> None:
        fields = {**common, **_result_fields(outcome.result), "error": None}
        session_id = fields.get("claude_session_id")
        if session_id:
            folder = record.get("folder") or str(self._folder(record))
            self.store.client.set(keys.session(session_id), folder)
        self._end(
            TaskStatus.SUCCEEDED,
            fields,
            {
                "claude_session_id": session_id,
                "cost_usd": fields.get("cost_usd"),
                "num_turns": fields.get("num_turns"),
            },
        )

    def _retry(
        self,
        outcome: Outcome,
        attempt: int,
        common: dict[str, Any],
        record: dict[str, Any],
    ) -> None:
        min_backoff_ms = int(
            1000
            * float(
                record.get("retry_min_backoff_s") or self.settings.retry_min_backoff_s
            )
        )
        max_backoff_ms = int(
            1000
            * float(
                record.get("retry_max_backoff_s") or self.settings.retry_max_backoff_s
            )
        )
        _, delay_ms = compute_backoff(
            attempt - 1, factor=min_backoff_ms, max_backoff=max_backoff_ms
        )
        applied, before, _ = self.store.transition(
            self.task_id,
            allowed_from=(TaskStatus.RUNNING,),
            fields={
                **common,
                **_result_fields(outcome.result),
                "status": TaskStatus.RETRYING.value,
                "error": outcome.message,
                "error_class": outcome.error_class,
                "http_status": outcome.http_status,
                "retry_at": time.time() + delay_ms / 1000,
            },
            event_type=EventType.TASK_RETRYING,
            payload={
                "delay_s": delay_ms / 1000,
                "error_class": outcome.error_class,
                "http_status": outcome.http_status,
            },
        )
        if not applied:
            logger.info("Task %s is %s; no retry.", self.task_id, before)
            return
        logger.warning(
            "Task %s attempt %d failed (%s); retrying in %.1f s.",
            self.task_id,
            attempt,
            outcome.error_class,
            delay_ms / 1000,
        )
        raise dramatiq.Retry(delay=delay_ms)

    def _end(
        self,
        status: TaskStatus,
        fields: dict[str, Any],
        payload: dict[str, Any],
    ) -> bool:
        applied, before, attempt = self.store.transition(
            self.task_id,
            allowed_from=(TaskStatus.RUNNING,),
            fields={**fields, "status": status.value},
            event_type=TERMINAL_EVENTS[status],
            payload={"status": status.value, **payload},
        )
        if applied:
            logger.info(
                "Task %s attempt %d ended %s.", self.task_id, attempt, status.value
            )
        else:
            logger.info(
                "Task %s was already %s; outcome %s dropped.",
                self.task_id,
                before,
                status.value,
            )
        return applied

    def _fail_for_good(
        self, error_class: str, message: str, fields: dict[str, Any] | None = None
    ) -> None:
        applied, before, attempt = self.store.transition(
            self.task_id,
            allowed_from=STARTABLE,
            # Result fields are cleared unless given, so the cost of an earlier
            # attempt is not counted again with this one.
            fields={
                **_result_fields({}),
                **(fields or {}),
                "status": TaskStatus.FAILED.value,
                "finished_at": time.time(),
                "error": message,
                "error_class": error_class,
            },
            event_type=EventType.TASK_FAILED,
            payload={"status": "failed", "error_class": error_class, "error": message},
        )
        if applied:
            logger.warning(
                "Task %s attempt %d failed (%s); moved to the dead-letter queue.",
                self.task_id,
                attempt,
                error_class,
            )
            raise PermanentTaskError(message)
        logger.info("Task %s was already %s; failure dropped.", self.task_id, before)

    def _hand_back(self, attempt: int) -> None:
        """Return a task interrupted by worker shutdown to the queue."""
        self.store.transition(
            self.task_id,
            allowed_from=(TaskStatus.RUNNING,),
            # A handed-back attempt does not count against max_retries.
            fields={
                "status": TaskStatus.RETRYING.value,
                "attempt": attempt - 1,
                "error": "worker_shutdown: handed back to the queue",
                "retry_at": time.time(),
            },
            event_type=EventType.TASK_RETRYING,
            payload={"delay_s": 0, "error_class": "worker_shutdown"},
        )
        logger.warning(
            "Task %s attempt %d interrupted by worker shutdown; its tree was "
            "killed and the message goes back to the queue.",
            self.task_id,
            attempt,
        )


def _result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Pick the task record fields from the CLI's result object.

    Every field is returned, None when the attempt left no result, so that
    no value of an earlier attempt is taken for this one's.
    """
    result = result or {}
    return {
        "result": result.get("result"),
        "claude_session_id": result.get("session_id"),
        "cost_usd": result.get("total_cost_usd"),
        "num_turns": result.get("num_turns"),
        "usage": result.get("usage"),
        "duration_api_ms": result.get("duration_api_ms"),
    }
