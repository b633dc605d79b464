"""Plain Dramatiq baseline: one actor on a RedisBroker with default settings.

Workers run ``dramatiq bench.baseline_dramatiq`` with ``BENCH_REDIS_URL`` set;
the benchmark process calls ``declare(url)`` to get the actor it sends to.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from bench.baseline_task import run_and_record

#: Queue of the baseline actor.
QUEUE = "bench"


def declare(url: str) -> dramatiq.Actor:
    """Make a RedisBroker on ``url`` the global broker and declare the actor."""
    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)
    recorder = redis.Redis.from_url(url)

    @dramatiq.actor(queue_name=QUEUE, broker=broker)
    def trivial_task(tag: str) -> None:
        run_and_record(recorder, tag)

    return trivial_task


if "BENCH_REDIS_URL" in os.environ:
    trivial_task = declare(os.environ["BENCH_REDIS_URL"])
