"""WakingRedisConsumer on a real redis-server: its waits end on a token or an ack."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq.message import Message

from ksi_worker import keys
from ksi_worker.broker import MaintainedRedisBroker
from ksi_worker.consumer import WAKE_TOKENS_MAX, WakingRedisConsumer

QUEUE = "wake_test"

#: Idle timeout of the consumers, in milliseconds. With the backoff at its
#: maximum, a wait that no token or ack ends lasts 5 to 10 s.
LONG_TIMEOUT_MS = 10_000

#: Backoff steps that take compute_backoff to its maximum.
MAX_MISSES = 20

#: Seconds within which a woken wait must end; far below the 5 s minimum.
WAKE_LIMIT_S = 2.0


@pytest.fixture
def broker(redis_server: str) -> Iterator[MaintainedRedisBroker]:
    broker = MaintainedRedisBroker(
        client=redis.Redis.from_url(redis_server), maintenance_interval_s=5
    )
    broker.declare_queue(QUEUE)
    yield broker
    broker.client.close()


def message(n: int) -> Message:
    return Message(
        queue_name=QUEUE, actor_name="noop", args=(n,), kwargs={}, options={}
    )


def timed_next(consumer: WakingRedisConsumer) -> tuple[threading.Thread, list]:
    """Call next(consumer) in a thread; the list gets its result and seconds."""
    outcome: list = []

    def call() -> None:
        started = time.monotonic()
        result = next(consumer)
        outcome.extend([result, time.monotonic() - started])

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


def test_broker_uses_waking_consumer(broker: MaintainedRedisBroker) -> None:
    consumer = broker.consume(QUEUE, prefetch=1, timeout=LONG_TIMEOUT_MS)
    assert isinstance(consumer, WakingRedisConsumer)


def test_enqueue_pushes_wake_token(broker: MaintainedRedisBroker) -> None:
    broker.enqueue(message(1))
    assert broker.client.llen(keys.wake(QUEUE)) == 1


def test_delayed_enqueue_wakes_delay_queue(broker: MaintainedRedisBroker) -> None:
    broker.enqueue(message(1), delay=60_000)
    assert broker.client.llen(keys.wake(f"{QUEUE}.DQ")) == 1


def test_wake_tokens_capped(broker: MaintainedRedisBroker) -> None:
    for n in range(WAKE_TOKENS_MAX + 20):
        broker.enqueue(message(n))
    assert broker.client.llen(keys.wake(QUEUE)) == WAKE_TOKENS_MAX


def test_idle_consumer_wakes_on_enqueue(broker: MaintainedRedisBroker) -> None:
    consumer = broker.consume(QUEUE, prefetch=1, timeout=LONG_TIMEOUT_MS)
    consumer.misses = MAX_MISSES
    thread, outcome = timed_next(consumer)
    time.sleep(0.3)  # the consumer now waits in BLPOP
    broker.enqueue(message(1))
    thread.join(timeout=15)

    result, waited_s = outcome
    assert result is None
    assert waited_s < WAKE_LIMIT_S
    assert next(consumer).args == (1,)


def test_busy_consumer_wakes_on_ack(broker: MaintainedRedisBroker) -> None:
    consumer = broker.consume(QUEUE, prefetch=1, timeout=LONG_TIMEOUT_MS)
    broker.enqueue(message(1))
    fetched = next(consumer)
    consumer.misses = MAX_MISSES
    thread, outcome = timed_next(consumer)
    time.sleep(0.3)  # the consumer now waits for a free slot
    consumer.ack(fetched)
    thread.join(timeout=15)

    result, waited_s = outcome
    assert result is None
    assert waited_s < WAKE_LIMIT_S


def test_busy_consumer_leaves_token(broker: MaintainedRedisBroker) -> None:
    consumer = broker.consume(QUEUE, prefetch=1, timeout=LONG_TIMEOUT_MS)
    broker.enqueue(message(1))
    next(consumer)
    broker.client.delete(keys.wake(QUEUE))
    broker.enqueue(message(2))
    assert next(consumer) is None  # busy: waits a few ms, takes no token
    assert broker.client.llen(keys.wake(QUEUE)) == 1


def test_worker_picks_up_after_idle(broker: MaintainedRedisBroker) -> None:
    """A whole Dramatiq worker, idle past its poll schedule, starts a task at once."""
    started: list[float] = []

    @dramatiq.actor(queue_name=QUEUE, broker=broker, actor_name="record_start")
    def record_start() -> None:
        started.append(time.monotonic())

    # A shorter timeout than the other tests', because stop() waits for each
    # consumer's current wait to end.
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=3_000)
    worker.start()
    try:
        time.sleep(4)  # the backoff has reached 1.5 to 3 s by now
        sent = time.monotonic()
        record_start.send()
        deadline = sent + 15
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop(timeout=15_000)

    assert started, "the task did not run within 15 s"
    assert started[0] - sent < 1.0
