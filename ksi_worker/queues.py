"""Read Dramatiq's queue depths straight from its Redis keys.

Dramatiq's Redis broker (2.2.1) keeps, under the ``dramatiq`` namespace, a
list of ready message ids per queue (``dramatiq:<queue>``), the same for
delayed messages (``dramatiq:<queue>.DQ``), and a sorted set of dead letters
(``dramatiq:<queue>.XQ``).
"""

from __future__ import annotations

import redis

NAMESPACE = "dramatiq"


def ready_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}"


def delayed_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.DQ"


def dead_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.XQ"


def queue_depth(client: redis.Redis, queue: str) -> dict[str, int]:
    """Return the ready, delayed and dead-letter message counts of a queue."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(ready_key(queue))
    pipe.llen(delayed_key(queue))
    pipe.zcard(dead_key(queue))
    ready, delayed, dead = pipe.execute()
    return {"ready": ready, "delayed": delayed, "dead": dead}
