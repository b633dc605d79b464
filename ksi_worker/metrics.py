"""Task metrics of the workers, fed by a Dramatiq middleware.

Every worker process records into prometheus-client's multiprocess folder,
``PROMETHEUS_MULTIPROC_DIR``, which must be set before prometheus_client is
imported. The ``metrics`` program (ksi_worker.exporter) sums the processes'
files at scrape time. Counters and histograms of a process that exited keep
counting in the sum, and the in-progress gauge (``livesum``) of a dead process
is dropped by the exporter.

The outcome of an attempt is read from the task record after the actor
returns, because TaskAttempt writes every state change there: one HGETALL per
message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from dramatiq import Middleware
from dramatiq.common import q_name
from prometheus_client import Counter, Gauge, Histogram

from .lifecycle import TERMINAL_STATUSES, TaskStatus
from .store import TaskStore

logger = logging.getLogger(__name__)

#: Histogram buckets in seconds, from a second to an hour: tasks take minutes.
LATENCY_BUCKETS_S = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

#: Outcome label of an attempt that failed and was scheduled to run again.
RETRIED = "retried"

#: Token kinds of ``ksi_claude_tokens_total``, keyed by the CLI's usage field.
TOKEN_KINDS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_input_tokens": "cache_read",
    "cache_creation_input_tokens": "cache_creation",
}

#: Record failures between two repeated warnings about an unreadable record.
WARN_EVERY = 100

QUEUE_WAIT = Histogram(
    "ksi_task_queue_wait_seconds",
    "Seconds from a message becoming ready (enqueue, or the due time of a "
    "retry) to the start of the attempt.",
    ["queue"],
    buckets=LATENCY_BUCKETS_S,
)
CLAUDE_RUN = Histogram(
    "ksi_claude_run_seconds",
    "Seconds the Claude CLI ran in one attempt, by the attempt's outcome.",
    ["queue", "outcome"],
    buckets=LATENCY_BUCKETS_S,
)
END_TO_END = Histogram(
    "ksi_task_end_to_end_seconds",
    "Seconds from a task's enqueue to its terminal state.",
    ["queue", "outcome"],
    buckets=LATENCY_BUCKETS_S,
)
TASKS = Counter(
    "ksi_tasks",
    "Tasks that reached a terminal state, by outcome.",
    ["queue", "outcome"],
)
RETRIES = Counter(
    "ksi_task_retries",
    "Attempts that failed with a retryable error and were scheduled again.",
    ["queue"],
)
DEAD_LETTERS = Counter(
    "ksi_task_dead_letters",
    "Messages moved to the dead-letter queue.",
    ["queue"],
)
COST = Counter(
    "ksi_claude_cost_usd",
    "USD spent by Claude CLI runs, as reported in the CLI's total_cost_usd.",
    ["queue"],
)
TOKENS = Counter(
    "ksi_claude_tokens",
    "Tokens used by Claude CLI runs, by kind (input, output, cache_read, "
    "cache_creation).",
    ["queue", "kind"],
)
IN_PROGRESS = Gauge(
    "ksi_tasks_in_progress",
    "Messages being processed by worker threads.",
    ["queue"],
    multiprocess_mode="livesum",
)


@dataclass(frozen=True)
class _Delivery:
    started_at: float


class TaskMetrics(Middleware):
    """Record latency, outcome, retry, dead-letter and cost metrics of tasks.

    Parameters:
      store: Task store on the bundle's Redis, read once after each message.
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._deliveries: dict[str, _Delivery] = {}
        self._read_failures = 0

    def after_worker_boot(self, broker, worker) -> None:
        # Series exist from the start, so rate() and the dashboard see zeros
        # instead of gaps, and a reused pid does not inherit a stale gauge.
        for queue in {q_name(name) for name in broker.get_declared_queues()}:
            IN_PROGRESS.labels(queue).set(0)
            RETRIES.labels(queue)
            DEAD_LETTERS.labels(queue)
            COST.labels(queue)
            for status in TERMINAL_STATUSES:
                TASKS.labels(queue, status.value)
            for kind in TOKEN_KINDS.values():
                TOKENS.labels(queue, kind)

    def before_process_message(self, broker, message) -> None:
        with self._lock:
            self._deliveries[message.message_id] = _Delivery(started_at=time.time())
        IN_PROGRESS.labels(q_name(message.queue_name)).inc()

    def after_skip_message(self, broker, message) -> None:
        self._end_delivery(message)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        delivery = self._end_delivery(message)
        if delivery is None or not message.args:
            return
        record = self._read_record(str(message.args[0]))
        if record is not None:
            self._observe(q_name(message.queue_name), message, delivery, record)

    def after_nack(self, broker, message) -> None:
        DEAD_LETTERS.labels(q_name(message.queue_name)).inc()

    def _end_delivery(self, message) -> _Delivery | None:
        with self._lock:
            delivery = self._deliveries.pop(message.message_id, None)
        if delivery is not None:
            IN_PROGRESS.labels(q_name(message.queue_name)).dec()
        return delivery

    def _read_record(self, task_id: str) -> dict[str, Any] | None:
        try:
            return self.store.get(task_id)
        except redis.RedisError as error:
            self._read_failures += 1
            if self._read_failures % WARN_EVERY == 1:
                logger.warning(
                    "Task %s: could not read its record, so the metrics of this "
                    "attempt are lost (%d such failures so far): %s",
                    task_id,
                    self._read_failures,
                    error,
                )
            return None

    def _observe(
        self, queue: str, message, delivery: _Delivery, record: dict[str, Any]
    ) -> None:
        try:
            status = TaskStatus(record.get("status"))
        except ValueError:
            return
        enqueued_at = message.message_timestamp / 1000
        started_at = _number(record.get("started_at"))
        finished_at = _number(record.get("finished_at"))
        # Only a delivery that started the attempt reports it: a message that
        # was throttled, or found its task ended, leaves the record untouched.
        started_here = (
            started_at is not None
            and started_at >= delivery.started_at
            and record.get("worker_pid") == os.getpid()
        )
        if not started_here:
            # The one terminal state a worker writes without starting an attempt.
            if (
                status is TaskStatus.FAILED
                and record.get("error_class") == "attempts_exhausted"
                and finished_at is not None
                and finished_at >= delivery.started_at
            ):
                count_terminal(queue, status, finished_at - enqueued_at)
            return
        ready_at = max(enqueued_at, _number(record.get("retry_at")) or 0.0)
        QUEUE_WAIT.labels(queue).observe(max(0.0, started_at - ready_at))

        if finished_at is None or finished_at < started_at:
            # Handed back at shutdown, or the actor failed before the end.
            return
        if status is TaskStatus.RETRYING:
            outcome = RETRIED
            RETRIES.labels(queue).inc()
        elif status.is_terminal:
            outcome = status.value
            count_terminal(queue, status, finished_at - enqueued_at)
        else:
            return
        elapsed_s = _number(record.get("elapsed_s"))
        if elapsed_s is not None:
            CLAUDE_RUN.labels(queue, outcome).observe(elapsed_s)

        # Each attempt that ends writes its own cost_usd and usage, None when
        # the CLI printed no result, so every attempt is counted once.
        if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.RETRYING):
            self._count_usage(queue, record)

    @staticmethod
    def _count_usage(queue: str, record: dict[str, Any]) -> None:
        cost = _number(record.get("cost_usd"))
        if cost is not None and cost > 0:
            COST.labels(queue).inc(cost)
        usage = record.get("usage")
        if not isinstance(usage, dict):
            return
        for field, kind in TOKEN_KINDS.items():
            tokens = _number(usage.get(field))
            if tokens is not None and tokens > 0:
                TOKENS.labels(queue, kind).inc(tokens)


def count_terminal(queue: str, status: TaskStatus, end_to_end_s: float) -> None:
    """Count a task that reached a terminal state, with its enqueue-to-end time."""
    TASKS.labels(queue, status.value).inc()
    END_TO_END.labels(queue, status.value).observe(max(0.0, end_to_end_s))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
