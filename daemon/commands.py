"""Handlers of the daemon's commands.

Each handler takes the request's params and returns the reply's result, or
raises ProtocolError. Redis calls are blocking, so handlers run them in a
thread with ``asyncio.to_thread`` and the event loop keeps serving others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from ksi_worker.lifecycle import EventType, TaskStatus
from ksi_worker.metrics import TASKS
from ksi_worker.presence import live_workers
from ksi_worker.queues import list_dead_letters, queue_depth, remove_dead_letters
from ksi_worker.settings import Settings
from ksi_worker.store import TaskStore, new_task_id, public_record
from ksi_worker.throttle import spend_last_hour, throttled_agents

from .host_health import claude_cli_problem, supervisor_problems
from .protocol import (
    ID_PATTERN,
    ProtocolError,
    invalid,
    optional_number,
    reject_unknown,
    require_str,
    validate_task_params,
)

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: Seconds an idempotency key keeps returning the task it first queued.
IDEMPOTENCY_TTL_S = 24 * 3600

#: States from which RETRY_TASK queues a task again.
REPLAYABLE = (TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED)

#: States from which CANCEL_TASK ends a task at once, before it starts.
CANCELLABLE_BEFORE_START = (TaskStatus.QUEUED, TaskStatus.RETRYING)


class Commands:
    """The daemon's command table.

    Parameters:
      settings: Bundle settings.
      store: Task store on the bundle's Redis.
      send_task: Enqueues the Dramatiq message of a task id.
    """

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        send_task: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.send_task = send_task
        self.started_at = time.time()
        self.connections = 0
        self.table: dict[str, Handler] = {
            "QUEUE_TASK": self.queue_task,
            "TASK_STATUS": self.task_status,
            "LIST_TASKS": self.list_tasks,
            "CANCEL_TASK": self.cancel_task,
            "RETRY_TASK": self.retry_task,
            "LIST_DEAD_LETTERS": self.list_dead_letters,
            "PURGE_DEAD_LETTERS": self.purge_dead_letters,
            "HEALTH_CHECK": self.health_check,
        }

    async def queue_task(self, params: dict[str, Any]) -> dict[str, Any]:
        fields = validate_task_params(params)
        # Record the defaults in force now, so the record shows what ran.
        fields.setdefault("model", self.settings.model)
        fields.setdefault("timeout_s", self.settings.task_timeout_s)
        depth = await asyncio.to_thread(
            queue_depth, self.store.client, self.settings.queue
        )
        waiting = depth["ready"] + depth["delayed"]
        if waiting >= self.settings.max_queued:
            raise ProtocolError(
                "QUEUE_FULL",
                f"queue {self.settings.queue} holds {waiting} waiting tasks, the "
                f"limit KSI_MAX_QUEUED is {self.settings.max_queued}; retry later "
                "or raise the limit",
            )
        task_id = new_task_id()
        # One thread writes the record and sends its message. asyncio.run lets
        # that thread finish when the daemon stops, so a stop cannot leave a
        # queued record that no message carries.
        # NOTE: a daemon killed with SIGKILL between the two still can.
        record = await asyncio.to_thread(self._create_and_send, task_id, fields)
        if record["task_id"] != task_id:
            logger.info(
                "Task %s returned again for idempotency key %r.",
                record["task_id"],
                fields["idempotency_key"],
            )
            return {
                "task_id": record["task_id"],
                "status": record["status"],
                "duplicate": True,
            }
        logger.info(
            "Task %s queued (%d prompt bytes, model %s).",
            task_id,
            fields["prompt_bytes"],
            fields.get("model") or self.settings.model,
        )
        return {"task_id": task_id, "status": TaskStatus.QUEUED.value}

    def _create_and_send(self, task_id: str, fields: dict[str, Any]) -> dict:
        """Create the task and send its message; return the record created.

        With an idempotency key that already names a task, nothing is written
        and that task's record is returned.
        """
        record = self.store.create(
            task_id,
            fields,
            idempotency_key=fields.get("idempotency_key"),
            idempotency_ttl_s=IDEMPOTENCY_TTL_S,
        )
        if record["task_id"] != task_id:
            return record
        try:
            self.send_task(task_id)
        except Exception as error:
            # The record exists but no message carries it: end it as failed so
            # the client sees the loss instead of a task queued forever.
            logger.error("Task %s could not be enqueued: %s", task_id, error)
            self.store.transition(
                task_id,
                allowed_from=(TaskStatus.QUEUED,),
                fields={
                    "status": TaskStatus.FAILED.value,
                    "error": f"enqueue_failed: {error}",
                    "error_class": "enqueue_failed",
                    "finished_at": time.time(),
                },
                event_type=EventType.TASK_FAILED,
                payload={"error_class": "enqueue_failed"},
            )
            TASKS.labels(self.settings.queue, TaskStatus.FAILED.value).inc()
            raise ProtocolError(
                "UNAVAILABLE", f"task {task_id} could not be enqueued: {error}"
            ) from None
        return record

    async def task_status(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, {"task_id"})
        task_id = require_str(params, "task_id", ID_PATTERN)
        record = await asyncio.to_thread(self.store.get, task_id)
        if record is None:
            raise ProtocolError("NOT_FOUND", f"task {task_id} not found")
        return public_record(record)

    async def list_tasks(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, {"status", "limit"})
        status = params.get("status")
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise invalid(
                f"status={status!r} is not a task state; use one of "
                f"{', '.join(s.value for s in TaskStatus)}"
            )
        limit = optional_number(params, "limit", minimum=1, maximum=1000, integer=True)
        tasks = await asyncio.to_thread(
            self.store.list, status=status, limit=int(limit or 50)
        )
        return {"tasks": tasks}

    async def cancel_task(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, {"task_id"})
        task_id = require_str(params, "task_id", ID_PATTERN)
        applied, before, _ = await asyncio.to_thread(
            self.store.transition,
            task_id,
            allowed_from=CANCELLABLE_BEFORE_START,
            fields={
                "status": TaskStatus.CANCELLED.value,
                "finished_at": time.time(),
                "error": "cancelled by request before it started",
                "error_class": "cancelled",
            },
            event_type=EventType.TASK_CANCELLED,
            payload={"status": TaskStatus.CANCELLED.value, "before_start": True},
        )
        if before is None:
            raise ProtocolError("NOT_FOUND", f"task {task_id} not found")
        if applied:
            # No worker runs it, so the task metrics count it here.
            TASKS.labels(self.settings.queue, TaskStatus.CANCELLED.value).inc()
            logger.info("Task %s cancelled before it started.", task_id)
            return {"task_id": task_id, "status": TaskStatus.CANCELLED.value}
        if before.is_terminal:
            raise ProtocolError(
                "ALREADY_ENDED", f"task {task_id} already ended {before.value}"
            )
        # Running: the worker polls this flag and kills the task's tree.
        await asyncio.to_thread(
            self.store.set_fields, task_id, {"cancel_requested": True}
        )
        logger.info("Task %s: cancel requested while running.", task_id)
        return {"task_id": task_id, "status": "cancelling"}

    async def retry_task(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, {"task_id"})
        task_id = require_str(params, "task_id", ID_PATTERN)
        record = await asyncio.to_thread(self.store.get, task_id)
        if record is None:
            raise ProtocolError("NOT_FOUND", f"task {task_id} not found")
        status = TaskStatus(record["status"])
        if status not in REPLAYABLE:
            raise ProtocolError(
                "INVALID_STATE",
                f"task {task_id} is {status.value}; only failed, timed_out and "
                "cancelled tasks can be retried",
            )
        max_retries = record.get("max_retries")
        if max_retries is None:
            max_retries = self.settings.max_retries
        attempt = int(record.get("attempt") or 0)
        applied, before, _ = await asyncio.to_thread(
            self.store.transition,
            task_id,
            allowed_from=REPLAYABLE,
            fields={
                "status": TaskStatus.QUEUED.value,
                "attempt_limit": attempt + int(max_retries) + 1,
                "replays": int(record.get("replays") or 0) + 1,
                "error": None,
                "cancel_requested": False,
            },
            event_type=EventType.TASK_QUEUED,
            payload={"replay": True, "previous_status": status.value},
        )
        if not applied:
            raise ProtocolError(
                "INVALID_STATE", f"task {task_id} changed to {before} meanwhile"
            )
        await asyncio.to_thread(
            remove_dead_letters, self.store.client, self.settings.queue, task_id
        )
        await asyncio.to_thread(self.send_task, task_id)
        logger.info("Task %s replayed after it ended %s.", task_id, status.value)
        return {"task_id": task_id, "status": TaskStatus.QUEUED.value}

    async def list_dead_letters(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, {"limit"})
        limit = optional_number(params, "limit", minimum=1, maximum=1000, integer=True)
        letters = await asyncio.to_thread(
            list_dead_letters, self.store.client, self.settings.queue, int(limit or 100)
        )
        for letter in letters:
            record = await asyncio.to_thread(self.store.get, letter["task_id"] or "")
            if record:
                letter["status"] = record.get("status")
                letter["error"] = record.get("error")
                letter["attempt"] = record.get("attempt")
        return {"queue": self.settings.queue, "dead_letters": letters}

    async def purge_dead_letters(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, set())
        removed = await asyncio.to_thread(
            remove_dead_letters, self.store.client, self.settings.queue
        )
        logger.info(
            "Purged %d dead letters of queue %s.", len(removed), self.settings.queue
        )
        return {"queue": self.settings.queue, "purged": len(removed)}

    async def health_check(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, set())
        daemon = {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "connections": self.connections,
        }
        # Checked before Redis, so that they show while Redis is down too.
        host_problems = await asyncio.to_thread(self._host_problems)
        try:
            redis_info, workers, depth, throttles = await asyncio.to_thread(
                self._redis_health
            )
        except redis.RedisError as error:
            return {
                "status": "unavailable",
                "problems": [f"Redis is unreachable: {error}", *host_problems],
                "redis": {"ok": False, "error": str(error)},
                "daemon": daemon,
            }
        problems = [*host_problems, *throttles]
        if not workers:
            problems.append("no live worker; check `ksi-supervisorctl status`")
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "redis": redis_info,
            "live_workers": len(workers),
            "workers": workers,
            "queues": {self.settings.queue: depth},
            "daemon": daemon,
        }

    def _host_problems(self) -> list[str]:
        problems = supervisor_problems(self.settings.run_dir / "supervisor.sock")
        claude_problem = claude_cli_problem(self.settings.claude_bin)
        if claude_problem is not None:
            problems.insert(0, claude_problem)
        return problems

    def _redis_health(self) -> tuple[dict[str, Any], list[dict], dict[str, int], list]:
        client = self.store.client
        started = time.perf_counter()
        client.ping()
        latency_ms = (time.perf_counter() - started) * 1000
        redis_info = {"ok": True, "latency_ms": round(latency_ms, 2)}
        depth = queue_depth(client, self.settings.queue)
        return redis_info, live_workers(client), depth, self._throttles(client)

    def _throttles(self, client: redis.Redis) -> list[str]:
        """Describe each limit that keeps tasks waiting right now."""
        reasons = []
        budget = self.settings.budget_usd_per_hour
        if budget > 0:
            spent = spend_last_hour(client)
            if spent >= budget:
                reasons.append(
                    f"budget: ${spent:.2f} spent in the last hour, limit "
                    f"${budget:.2f}; tasks wait in the queue"
                )
        for agent_id in throttled_agents(client):
            reasons.append(
                f"rate limit: agent {agent_id} exceeded "
                f"{self.settings.agent_starts_per_minute} starts per minute; its "
                "tasks wait in the queue"
            )
        return reasons
