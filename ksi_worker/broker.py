"""The Dramatiq Redis broker shared by the workers and the daemon."""

from __future__ import annotations

import threading
import time

import dramatiq
import redis
from dramatiq.brokers.redis import MAINTENANCE_COMMAND_BLACKLIST, RedisBroker
from dramatiq.middleware import CurrentMessage
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .consumer import WakingRedisConsumer, push_wake_token
from .settings import Settings


def redis_client(settings: Settings, *, retries: int = 20) -> redis.Redis:
    """Return a client that retries a command when Redis is unreachable.

    With the default 20 retries, backing off to 1 s, a command waits about
    15 s, so a Redis restart delays a worker's writes instead of losing a
    task's outcome. Lua scripts are reloaded after a restart by redis-py.
    OSError is retried too, because connecting to a unix socket whose file
    is missing while Redis restarts raises FileNotFoundError (redis 7.0.1).
    """
    retry = Retry(
        ExponentialBackoff(cap=1.0, base=0.05),
        retries=retries,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, OSError),
    )
    return redis.Redis.from_url(
        settings.redis_url,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, OSError],
    )


class MaintainedRedisBroker(RedisBroker):
    """A RedisBroker whose queue maintenance runs at least every few seconds,
    and whose idle consumers wake up when a message is enqueued.

    Maintenance is the step that returns the unacknowledged messages of a dead
    worker to their queue. RedisBroker (dramatiq 2.2.1) runs it on a random
    0.1% of its Redis calls, so on a quiet bundle a dead worker's task could
    wait without bound. Here each queue also gets maintenance on its first
    call after ``maintenance_interval_s``.

    Every enqueue also pushes a wake-up token for the queue, and consumers are
    ``WakingRedisConsumer``, which waits for that token instead of sleeping
    between polls (see ``ksi_worker.consumer``).

    Parameters:
      maintenance_interval_s: Longest time between two maintenance passes of
        a queue, in seconds, while any consumer polls it.
      **kwargs: Passed to RedisBroker (url, heartbeat_timeout in ms, ...).
    """

    def __init__(self, *, maintenance_interval_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.maintenance_interval_s = maintenance_interval_s
        self._next_maintenance: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def consumer_class(self) -> type[WakingRedisConsumer]:
        return WakingRedisConsumer

    def enqueue(
        self, message: dramatiq.Message, *, delay: int | None = None
    ) -> dramatiq.Message:
        message = super().enqueue(message, delay=delay)
        # A delayed message goes to the delay queue, whose name it now carries.
        push_wake_token(self.client, message.queue_name)
        return message

    # NOTE: _dispatch and _should_do_maintenance are private to dramatiq; this
    # override is checked against 2.2.1, the pinned version.
    def _dispatch(self, command):
        dispatch = super()._dispatch(command)

        def do_dispatch(queue_name, *args):
            self._local.queue_name = queue_name
            return dispatch(queue_name, *args)

        return do_dispatch

    def _should_do_maintenance(self, command: str) -> int:
        if command in MAINTENANCE_COMMAND_BLACKLIST:
            return 0
        queue_name = getattr(self._local, "queue_name", "")
        now = time.monotonic()
        with self._lock:
            if now >= self._next_maintenance.get(queue_name, 0.0):
                self._next_maintenance[queue_name] = now + self.maintenance_interval_s
                return 1
        return super()._should_do_maintenance(command)


def make_broker(settings: Settings) -> RedisBroker:
    """Create the broker and make it Dramatiq's global broker.

    Dramatiq's default middleware stays on (AgeLimit, TimeLimit,
    ShutdownNotifications, Callbacks, Pipelines, Retries); CurrentMessage is
    added so the actor can read its message's retry count.
    """
    # The broker shares the retrying client, so Dramatiq's own writes (acks,
    # retries, dead letters) also wait out a Redis restart.
    broker = MaintainedRedisBroker(
        client=redis_client(settings),
        heartbeat_timeout=int(settings.broker_heartbeat_timeout_s * 1000),
        maintenance_interval_s=settings.broker_maintenance_interval_s,
    )
    broker.add_middleware(CurrentMessage())
    dramatiq.set_broker(broker)
    return broker
