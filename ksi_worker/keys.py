"""Redis key layout of the bundle, beside Dramatiq's own ``dramatiq:*`` keys.

Read this module to see everything KSI stores in Redis:

- ``ksi:task:<task_id>``: hash, the task record. Each value is JSON.
- ``ksi:tasks``: sorted set of task ids scored by creation time (Unix seconds).
- ``ksi:events``: stream of task and agent events, capped at about
  ``KSI_EVENTS_MAXLEN`` entries.
- ``ksi:session:<claude_session_id>``: string, the work folder of the task
  that created that Claude session, so a ``--resume`` runs where the CLI
  keeps it.
- ``ksi:workers``: sorted set of live worker ids scored by last heartbeat.
- ``ksi:worker:<worker_id>``: hash describing one worker process (pid,
  create time, host, threads), expiring when its heartbeats stop.
"""

PREFIX = "ksi"
TASK_INDEX = f"{PREFIX}:tasks"
EVENT_STREAM = f"{PREFIX}:events"
WORKERS = f"{PREFIX}:workers"


def task(task_id: str) -> str:
    return f"{PREFIX}:task:{task_id}"


def session(claude_session_id: str) -> str:
    return f"{PREFIX}:session:{claude_session_id}"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"
