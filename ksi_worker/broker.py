"""The Dramatiq Redis broker shared by the workers and the daemon."""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from .settings import Settings


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def make_broker(settings: Settings) -> RedisBroker:
    """Create the broker and make it Dramatiq's global broker.

    Dramatiq's default middleware stays on (AgeLimit, TimeLimit,
    ShutdownNotifications, Callbacks, Pipelines, Retries); CurrentMessage is
    added so the actor can read its message's retry count.
    """
    broker = RedisBroker(url=settings.redis_url)
    broker.add_middleware(CurrentMessage())
    dramatiq.set_broker(broker)
    return broker
