"""A Dramatiq Redis consumer that waits for a wake-up instead of sleeping.

Dramatiq's Redis consumer (2.2.1) polls an empty queue and sleeps between
polls, backing off up to the worker timeout (``dramatiq_worker_timeout``, which
the bundle sets from ``KSI_WORKER_POLL_MS``, 1 s by default). A task sent to a
quiet bundle therefore waited up to that long before a worker fetched it, and
a worker whose only thread had just finished a task waited the same before
fetching the next one.

``WakingRedisConsumer`` keeps that poll schedule as an upper bound, but ends
each wait early:

- With a free thread, it waits with BLPOP on the queue's wake-up list
  (``ksi:wake:<queue>``), to which the broker pushes a token after every
  enqueue, so one idle consumer fetches the new message at once.
- With every thread busy, it waits on an event that the ack or nack of a
  message sets, so it fetches the next message as soon as a task ends. A busy
  consumer leaves the tokens to idle ones.

A token is pushed after its message is stored and a consumer fetches after it
pops one, so a woken consumer always finds the message unless another worker
took it first. Stale tokens, left by enqueues that found every worker busy, each
cost an idle consumer one early poll; the list is capped at
``WAKE_TOKENS_MAX``.
"""

from __future__ import annotations

import logging
import threading

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from . import keys

logger = logging.getLogger(__name__)

#: Wake-up tokens kept per queue at most.
WAKE_TOKENS_MAX = 64


def push_wake_token(client: redis.Redis, queue_name: str) -> None:
    """Hand one idle consumer of ``queue_name`` a wake-up token.

    A failure is logged and not raised: the message is already queued, and an
    idle consumer fetches it at its next poll anyway.
    """
    key = keys.wake(queue_name)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, 1)
        pipe.ltrim(key, 0, WAKE_TOKENS_MAX - 1)
        pipe.execute()
    except redis.RedisError as error:
        logger.warning(
            "Queue %s: cannot wake an idle worker (%s); the message waits for "
            "the next poll, at most KSI_WORKER_POLL_MS.",
            queue_name,
            error,
        )


class WakingRedisConsumer(_RedisConsumer):
    """A ``_RedisConsumer`` whose idle wait ends on a wake-up token or an ack.

    Parameters are those of Dramatiq's consumer: the broker, the queue name,
    the prefetch (messages held at once) and the idle timeout in milliseconds,
    which stays the longest wait between two polls.
    """

    def __init__(self, broker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.wake_key = keys.wake(queue_name)
        self.slot_freed = threading.Event()

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)
        finally:
            self.slot_freed.set()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        finally:
            self.slot_freed.set()

    # NOTE: This copies _RedisConsumer.__next__ of dramatiq 2.2.1, the pinned
    # version, and replaces only its backoff sleep with _wait.
    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                    if data is None:
                        self.logger.warning(
                            "Found 'None' message in message cache for queue %r.",
                            self.queue_name,
                        )
                        continue
                    self.misses = 0

                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                except IndexError:
                    # Cleared before the count is read, so an ack that frees a
                    # slot after this point ends the wait below.
                    self.slot_freed.clear()
                    free_slots = self.prefetch - self.outstanding_message_count
                    messages = []
                    if free_slots > 0:
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name, free_slots
                        )

                    if not messages:
                        self.misses, backoff_ms = compute_backoff(
                            self.misses, max_backoff=self.timeout
                        )
                        self._wait(backoff_ms / 1000, idle=free_slots > 0)
                        return None
        except redis.ConnectionError as error:
            raise ConnectionClosed(error) from None

    def _wait(self, timeout_s: float, *, idle: bool) -> None:
        if not idle:
            self.slot_freed.wait(timeout_s)
            return
        # Redis ends a BLPOP on its clock tick (every 100 ms at the default hz
        # of 10), so short waits take up to 100 ms unless a token arrives.
        self.broker.client.blpop([self.wake_key], timeout=max(timeout_s, 0.001))
