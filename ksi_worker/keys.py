"""Redis key layout of the bundle, beside Dramatiq's own ``dramatiq:*`` keys.

Read this module to see everything KSI stores in Redis:

- ``ksi:task:<task_id>``: hash, the task record. Each value is JSON.
- ``ksi:tasks``: sorted set of task ids scored by creation time (Unix seconds).
- ``ksi:running``: set of the ids of tasks in state ``running``, kept by the
  same script that changes a task's state.
- ``ksi:idempotency:<key>``: string, the id of the task queued with that
  ``idempotency_key``; expires after 24 hours.
- ``ksi:spend:<minute>``: float, USD spent by tasks that ended in that minute
  (Unix time // 60); expires after 2 hours.
- ``ksi:throttled_agents``: sorted set of agent ids scored by the last time
  one of their tasks was held back by the start rate limit.
- ``ksi:events``: stream of task and agent events, capped at about
  ``KSI_EVENTS_MAXLEN`` entries.
- ``ksi:session:<claude_session_id>``: string, the work folder of the task
  that created that Claude session, so a ``--resume`` runs where the CLI
  keeps it.
- ``ksi:workers``: sorted set of live worker ids scored by last heartbeat.
- ``ksi:worker:<worker_id>``: hash describing one worker process (pid,
  create time, host, threads), expiring when its heartbeats stop.
- ``ksi:wake:<queue>``: list of wake-up tokens, one pushed after each enqueue
  on that Dramatiq queue and popped by an idle consumer (BLPOP), capped at a
  few dozen entries (see ``ksi_worker.consumer``).
"""

PREFIX = "ksi"
TASK_INDEX = f"{PREFIX}:tasks"
EVENT_STREAM = f"{PREFIX}:events"
WORKERS = f"{PREFIX}:workers"
RUNNING = f"{PREFIX}:running"
THROTTLED_AGENTS = f"{PREFIX}:throttled_agents"


def idempotency(key: str) -> str:
    return f"{PREFIX}:idempotency:{key}"


def spend(minute: int) -> str:
    return f"{PREFIX}:spend:{minute}"


def task(task_id: str) -> str:
    return f"{PREFIX}:task:{task_id}"


def session(claude_session_id: str) -> str:
    return f"{PREFIX}:session:{claude_session_id}"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def wake(queue_name: str) -> str:
    return f"{PREFIX}:wake:{queue_name}"
