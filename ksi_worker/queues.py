"""Read Dramatiq's queue depths straight from its Redis keys.

Dramatiq's Redis broker (2.2.1) keeps, under the ``dramatiq`` namespace, a
list of ready message ids per queue (``dramatiq:<queue>``), the same for
delayed messages (``dramatiq:<queue>.DQ``), and a sorted set of dead letters
(``dramatiq:<queue>.XQ``, scored by the time in milliseconds) whose message
bodies sit in the hash ``dramatiq:<queue>.XQ.msgs``.
"""

from __future__ import annotations

import json

import redis

NAMESPACE = "dramatiq"


def ready_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}"


def delayed_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.DQ"


def delayed_messages_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.DQ.msgs"


def dead_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.XQ"


def queue_depth(client: redis.Redis, queue: str) -> dict[str, int]:
    """Return the ready, delayed and dead-letter message counts of a queue."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(ready_key(queue))
    # Workers fetch delayed messages at once and hold them until their eta,
    # so the delay list is mostly empty; their bodies stay in the hash.
    pipe.hlen(delayed_messages_key(queue))
    pipe.zcard(dead_key(queue))
    ready, delayed, dead = pipe.execute()
    return {"ready": ready, "delayed": delayed, "dead": dead}


def dead_messages_key(queue: str) -> str:
    return f"{NAMESPACE}:{queue}.XQ.msgs"


def list_dead_letters(client: redis.Redis, queue: str, limit: int = 100) -> list[dict]:
    """Return dead-lettered messages, newest first, with their task ids."""
    entries = client.zrevrange(dead_key(queue), 0, limit - 1, withscores=True)
    if not entries:
        return []
    bodies = client.hmget(dead_messages_key(queue), [entry for entry, _ in entries])
    letters = []
    for (redis_id, score), body in zip(entries, bodies, strict=True):
        message = json.loads(body) if body else {}
        args = message.get("args") or [None]
        letters.append(
            {
                "redis_message_id": redis_id.decode(),
                "message_id": message.get("message_id"),
                "task_id": args[0],
                "dead_lettered_at": score / 1000,
            }
        )
    return letters


def remove_dead_letters(
    client: redis.Redis, queue: str, task_id: str | None = None
) -> list[str]:
    """Delete the dead letters of one task, or all of them; return task ids."""
    removed = []
    for letter in list_dead_letters(client, queue, limit=1_000_000):
        if task_id is not None and letter["task_id"] != task_id:
            continue
        pipe = client.pipeline(transaction=True)
        pipe.zrem(dead_key(queue), letter["redis_message_id"])
        pipe.hdel(dead_messages_key(queue), letter["redis_message_id"])
        pipe.execute()
        removed.append(letter["task_id"])
    return removed
