"""The ``execute_claude_task`` actor. Workers run ``dramatiq ksi_worker.actors``."""

from __future__ import annotations

import dramatiq

from .broker import make_broker, redis_client
from .drain import ShutdownDrain
from .execute import PermanentTaskError, TaskAttempt
from .logs import configure_logging
from .metrics import TaskMetrics
from .presence import WorkerPresence
from .settings import MAX_TASK_TIMEOUT_S, Settings
from .store import TaskStore

settings = Settings.from_env()
configure_logging(queue=settings.queue)
broker = make_broker(settings)
store = TaskStore(redis_client(settings), events_maxlen=settings.events_maxlen)
broker.add_middleware(WorkerPresence(store.client, threads=settings.worker_threads))
drain = ShutdownDrain(drain_s=settings.drain_s)
broker.add_middleware(drain)
broker.add_middleware(TaskMetrics(store))


def retry_when(retries: int, exception: BaseException) -> bool:
    """Retry what TaskAttempt asked to retry, and an unexpected error once."""
    return isinstance(exception, dramatiq.Retry) or retries < 1


@dramatiq.actor(
    queue_name=settings.queue,
    # The runner enforces each task's own limit; Dramatiq's TimeLimit only
    # catches a runner that hangs past the largest allowed limit.
    time_limit=(MAX_TASK_TIMEOUT_S + 600) * 1000,
    # Retries are decided per task in TaskAttempt and raised as dramatiq.Retry
    # with their delay; anything else that escapes is retried at most once.
    retry_when=retry_when,
    throws=(PermanentTaskError,),
)
def execute_claude_task(task_id: str) -> None:
    TaskAttempt(settings, store, task_id, drain=drain).run()
