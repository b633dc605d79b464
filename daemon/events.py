"""The daemon's event bus: one reader of the Redis event stream, many subscribers.

A single task reads ``ksi:events`` with ``XREAD BLOCK`` on one redis.asyncio
connection and offers each new event to every subscription. A subscription
keeps the events that match its filter in a bounded queue. When that queue is
full the subscription is marked overflowed and gets nothing more, so a client
that does not read never delays the reader, the other subscribers or the
daemon; :mod:`daemon.subscriptions` then disconnects it with a reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from ksi_worker import keys
from ksi_worker.store import decode_event

logger = logging.getLogger(__name__)

#: Events a subscriber may have waiting before it is disconnected as slow.
SUBSCRIBER_QUEUE_EVENTS = 1000

#: Maximum entries of one XREAD call. Each batch is fanned out with no
#: await, so this bounds how long one batch blocks the event loop.
READ_COUNT = 500

#: Maximum entries of one XRANGE call of a replay.
REPLAY_COUNT = 1000

#: Maximum wait of one XREAD call for new entries, in milliseconds.
BLOCK_MS = 5000

#: Maximum pause between two attempts to read a failing Redis, in seconds.
MAX_READ_BACKOFF_S = 5.0

#: Seconds the daemon's stop waits until subscribers are sent the reason.
STOP_TIMEOUT_S = 3.0

STREAM_ID_PATTERN = re.compile(r"^\d{1,20}(-\d{1,20})?$")

StreamId = tuple[int, int]


def parse_stream_id(text: str) -> StreamId:
    """Return a stream id such as ``1700000000000-3`` as a comparable pair."""
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True)
class StreamEvent:
    """One event of the stream, with its reply line encoded once for all."""

    id: StreamId
    id_text: str
    event_type: str
    task_id: str | None
    line: bytes

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: Mapping[bytes, bytes]) -> StreamEvent:
        event = decode_event(entry_id, fields)
        line = json.dumps({"event": event}, separators=(",", ":")).encode() + b"\n"
        return cls(
            id=parse_stream_id(event["id"]),
            id_text=event["id"],
            event_type=event["event_type"] or "",
            task_id=event["task_id"],
            line=line,
        )


@dataclass(frozen=True)
class EventFilter:
    """Filter of the events a subscriber receives; None matches everything."""

    event_types: frozenset[str] | None = None
    task_id: str | None = None

    def matches(self, event: StreamEvent) -> bool:
        if self.task_id is not None and event.task_id != self.task_id:
            return False
        return self.event_types is None or event.event_type in self.event_types

    def describe(self) -> str:
        types = ",".join(sorted(self.event_types)) if self.event_types else "all"
        return f"types {types}, task {self.task_id or 'any'}"


class EventBatch:
    """Events read together, whose joined lines are built once and shared.

    Every subscriber without a filter receives the same batch object, so
    the bytes written to each of them are the same ``data``.
    """

    __slots__ = ("events", "_data")

    def __init__(self, events: list[StreamEvent]) -> None:
        self.events = events
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = b"".join(event.line for event in self.events)
        return self._data

    @property
    def last_id(self) -> StreamId:
        return self.events[-1].id


class Subscription:
    """The bounded queue of one subscriber.

    The queue contains batches of events, and ``queued_events`` counts the
    events in it. A batch that would take it past ``maxsize`` marks the
    subscription overflowed instead. Each batch has at least one event,
    so the asyncio.Queue's own bound of ``maxsize`` items is never reached
    first.

    Parameters:
      event_filter: Events this subscriber receives.
      maxsize: Events it may have waiting before it counts as slow.
    """

    def __init__(self, event_filter: EventFilter, *, maxsize: int) -> None:
        self.filter = event_filter
        self.maxsize = maxsize
        self.queue: asyncio.Queue[EventBatch] = asyncio.Queue(maxsize)
        self.queued_events = 0
        self.overflowed = asyncio.Event()
        #: Set with a reason when the bus stops and the subscriber must leave.
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._unfiltered = event_filter == EventFilter()

    def offer(
        self, batch: EventBatch, filtered: dict[EventFilter, EventBatch | None]
    ) -> None:
        """Queue the events of ``batch`` that match; ``filtered`` caches the
        matching part by filter, so subscribers with equal filters share it."""
        if self.overflowed.is_set():
            return
        if not self._unfiltered:
            if self.filter not in filtered:
                matching = [e for e in batch.events if self.filter.matches(e)]
                filtered[self.filter] = EventBatch(matching) if matching else None
            if filtered[self.filter] is None:
                return
            batch = filtered[self.filter]
        if self.queued_events + len(batch.events) > self.maxsize:
            self.overflowed.set()
            return
        self.queue.put_nowait(batch)
        self.queued_events += len(batch.events)

    async def take(self) -> list[EventBatch]:
        """Wait for the next batch; return it with every other batch waiting."""
        batches = [await self.queue.get()]
        while not self.queue.empty():
            batches.append(self.queue.get_nowait())
        self.queued_events -= sum(len(batch.events) for batch in batches)
        return batches

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()


class EventBus:
    """Reads the event stream once and fans each event out in-process.

    Parameters:
      client: A redis.asyncio client (``decode_responses`` off) of the
        bundle's Redis. The reader holds one of its pool's connections in
        XREAD BLOCK; replays and info requests use others.
      queue_events: Size of each subscriber's queue, in events.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        queue_events: int = SUBSCRIBER_QUEUE_EVENTS,
    ) -> None:
        self.client = client
        self.queue_events = queue_events
        self.subscriptions: set[Subscription] = set()
        #: Id of the newest event read; None until the first read succeeds.
        self.last_id: str | None = None
        self.events_read = 0
        self.slow_disconnects = 0
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="event-bus")

    async def stop(self, reason: str, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop reading, tell every subscriber to leave with ``reason``, and
        wait up to ``timeout_s`` seconds for them to be sent it."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for subscription in list(self.subscriptions):
            subscription.close(reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.subscriptions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.client.aclose()

    def subscription(self, event_filter: EventFilter) -> Subscription:
        """Return a new subscription, not yet receiving events."""
        return Subscription(event_filter, maxsize=self.queue_events)

    def register(self, subscription: Subscription) -> str | None:
        """Start feeding a subscription; return the id of the newest event read.

        Every event read after that id reaches the subscription, because the
        reader updates ``last_id`` and fans a batch out with no await between.
        """
        self.subscriptions.add(subscription)
        return self.last_id

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)

    async def replay(
        self, after: str, *, count: int = REPLAY_COUNT
    ) -> tuple[list[StreamEvent], str, bool]:
        """Read up to ``count`` stream entries with ids above ``after``.

        Returns their events, the id to continue after, and whether the
        stream may hold more.
        """
        entries = await self.client.xrange(
            keys.EVENT_STREAM, min=f"({after}", count=count
        )
        events = []
        for entry_id, fields in entries:
            try:
                events.append(StreamEvent.from_entry(entry_id, fields))
            except (ValueError, UnicodeDecodeError):
                continue  # logged when the reader met it
        next_after = entries[-1][0].decode() if entries else after
        return events, next_after, len(entries) == count

    async def trimmed_after(self, since: str) -> bool:
        """Return whether events newer than ``since`` may have been trimmed.

        True when the stream ever lost entries to its length cap and its
        oldest entry is newer than ``since``.
        """
        try:
            info = await self.client.xinfo_stream(keys.EVENT_STREAM)
        except redis.ResponseError:
            return False  # no stream yet, so nothing was trimmed
        first = info.get("first-entry")
        if not first:
            return False
        added = info.get("entries-added")
        if isinstance(added, int) and added <= info.get("length", 0):
            return False
        return parse_stream_id(first[0].decode()) > parse_stream_id(since)

    async def info(self) -> dict[str, Any]:
        length = await self.client.xlen(keys.EVENT_STREAM)
        return {
            "stream": keys.EVENT_STREAM,
            "last_id": self.last_id,
            "length": length,
            "subscribers": len(self.subscriptions),
            "events_read": self.events_read,
            "slow_disconnects": self.slow_disconnects,
        }

    async def _newest_id(self) -> str:
        newest = await self.client.xrevrange(keys.EVENT_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def _read_forever(self) -> None:
        failures = 0
        while True:
            try:
                if self.last_id is None:
                    self.last_id = await self._newest_id()
                    logger.info(
                        "Event bus reading %s after id %s.",
                        keys.EVENT_STREAM,
                        self.last_id,
                    )
                reply = await self.client.xread(
                    {keys.EVENT_STREAM: self.last_id}, count=READ_COUNT, block=BLOCK_MS
                )
            except (redis.RedisError, OSError) as error:
                failures += 1
                delay_s = min(MAX_READ_BACKOFF_S, 0.1 * 2**failures)
                if failures == 1 or failures % 60 == 0:
                    logger.warning(
                        "Event bus cannot read %s (%s, %d failures in a row); "
                        "retrying in %.1f s. Subscribers stay connected.",
                        keys.EVENT_STREAM,
                        error,
                        failures,
                        delay_s,
                    )
                await asyncio.sleep(delay_s)
                continue
            if failures:
                logger.info("Event bus reading %s again.", keys.EVENT_STREAM)
                failures = 0
            for _stream, entries in reply or []:
                self._fan_out(entries)

    def _fan_out(self, entries: list) -> None:
        events = []
        for entry_id, fields in entries:
            try:
                events.append(StreamEvent.from_entry(entry_id, fields))
            except (ValueError, UnicodeDecodeError) as error:
                logger.warning(
                    "Event %s of %s is malformed (%s); not delivered.",
                    entry_id.decode(),
                    keys.EVENT_STREAM,
                    error,
                )
        if entries:
            self.last_id = entries[-1][0].decode()
            self.events_read += len(entries)
        if not events:
            return
        batch = EventBatch(events)
        filtered: dict[EventFilter, EventBatch | None] = {}
        for subscription in list(self.subscriptions):
            subscription.offer(batch, filtered)
