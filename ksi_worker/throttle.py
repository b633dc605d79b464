"""Hold tasks in the queue while an agent starts too many or spend is too high.

Runaway agents once started dozens of Claude sessions within minutes. Two
limits guard against that, both off by default: task starts per ``agent_id``
per minute (Dramatiq's WindowRateLimiter on the bundle's Redis) and USD spent
by the whole bundle over the last hour. A task past either limit is not
failed: its message goes back to the delay queue and it starts later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from dramatiq.rate_limits import WindowRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from . import keys
from .settings import Settings

logger = logging.getLogger(__name__)

#: Seconds before a task held back by the spend budget is offered to a worker again.
BUDGET_RECHECK_S = 60.0

#: Seconds a spend bucket (one per minute) is kept.
SPEND_BUCKET_TTL_S = 2 * 3600

_backends: dict[int, RedisBackend] = {}


def _backend(client: redis.Redis) -> RedisBackend:
    backend = _backends.get(id(client))
    if backend is None:
        backend = _backends[id(client)] = RedisBackend(client=client)
    return backend


def record_spend(
    client: redis.Redis, cost_usd: float, *, now: float | None = None
) -> None:
    minute = int((time.time() if now is None else now) // 60)
    pipe = client.pipeline(transaction=False)
    pipe.incrbyfloat(keys.spend(minute), cost_usd)
    pipe.expire(keys.spend(minute), SPEND_BUCKET_TTL_S)
    pipe.execute()


def spend_last_hour(client: redis.Redis, *, now: float | None = None) -> float:
    minute = int((time.time() if now is None else now) // 60)
    values = client.mget([keys.spend(m) for m in range(minute - 59, minute + 1)])
    return sum(float(value) for value in values if value is not None)


def throttle_reason(
    settings: Settings, client: redis.Redis, record: dict[str, Any]
) -> tuple[str, float] | None:
    """Return why a task must wait and for how many seconds, or None to start."""
    if settings.budget_usd_per_hour > 0:
        spent = spend_last_hour(client)
        if spent >= settings.budget_usd_per_hour:
            return (
                f"budget: ${spent:.2f} spent in the last hour, limit "
                f"${settings.budget_usd_per_hour:.2f} (KSI_BUDGET_USD_PER_HOUR)",
                BUDGET_RECHECK_S,
            )

    agent_id = record.get("agent_id")
    limit = settings.agent_starts_per_minute
    if agent_id and limit > 0:
        limiter = WindowRateLimiter(
            _backend(client), f"agent-starts:{agent_id}", limit=limit, window=60
        )
        with limiter.acquire(raise_on_failure=False) as acquired:
            if not acquired:
                client.zadd(keys.THROTTLED_AGENTS, {agent_id: time.time()})
                return (
                    f"rate limit: agent {agent_id} started {limit} tasks in the "
                    f"last minute (KSI_AGENT_STARTS_PER_MINUTE)",
                    # The window moves by the second; retry a little later.
                    5.0,
                )
    return None


def throttled_agents(client: redis.Redis, *, within_s: float = 60.0) -> list[str]:
    since = time.time() - within_s
    return [
        a.decode() for a in client.zrangebyscore(keys.THROTTLED_AGENTS, since, "+inf")
    ]
