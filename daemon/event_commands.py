"""SUBSCRIBE, PUBLISH and EVENTS_INFO: the daemon's event commands.

SUBSCRIBE turns its connection into a stream. The first reply line
acknowledges the subscription; then each event is one line
``{"event": {...}}`` (shape in :mod:`daemon.protocol`). With ``since``, the
events that followed that stream id are replayed first, so a client that
reconnects with the id of the last event it received misses nothing that is
still in the stream. A subscriber that falls ``SUBSCRIBER_QUEUE_EVENTS``
events behind gets an error line with code ``SLOW_SUBSCRIBER`` and is
disconnected; when the daemon stops, subscribers get ``SHUTTING_DOWN``.
Lines a client sends after SUBSCRIBE are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import redis

from ksi_worker.store import TaskStore

from .events import (
    STREAM_ID_PATTERN,
    EventBus,
    EventFilter,
    StreamId,
    Subscription,
    parse_stream_id,
)
from .protocol import (
    ID_PATTERN,
    ProtocolError,
    error_reply,
    invalid,
    ok_reply,
    optional_str,
    reject_unknown,
    require_str,
)

logger = logging.getLogger(__name__)

EVENT_TYPE_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")

#: Event types with this prefix belong to the task lifecycle, which only the
#: daemon and the workers write, so PUBLISH rejects them.
RESERVED_PREFIX = "TASK_"

#: Largest PUBLISH payload, in bytes of compact JSON.
MAX_PAYLOAD_BYTES = 64 * 1024

#: Largest value of either part of a Redis stream id (an unsigned 64-bit int).
MAX_STREAM_ID_PART = 2**64 - 1

#: Maximum entries of a SUBSCRIBE ``event_types`` filter.
MAX_FILTER_TYPES = 64

#: Seconds a replay write may wait for the client to read before the
#: subscriber counts as slow.
REPLAY_DRAIN_TIMEOUT_S = 30.0

#: Seconds a disconnected subscriber has to read its reason line before the
#: connection is dropped without it.
CLOSE_TIMEOUT_S = 10.0

#: The same while the daemon stops, which should not wait long.
SHUTDOWN_CLOSE_TIMEOUT_S = 1.0


def validate_subscribe(params: Mapping[str, Any]) -> tuple[EventFilter, str | None]:
    """Check SUBSCRIBE parameters; return the filter and the ``since`` id."""
    reject_unknown(params, {"event_types", "task_id", "since"})
    event_types = params.get("event_types")
    types: frozenset[str] | None = None
    if event_types is not None:
        if not isinstance(event_types, list) or not all(
            isinstance(name, str) for name in event_types
        ):
            raise invalid("event_types must be a list of strings such as TASK_QUEUED")
        if not event_types:
            raise invalid("event_types is empty; omit it to receive every event type")
        if len(event_types) > MAX_FILTER_TYPES:
            raise invalid(
                f"event_types has {len(event_types)} entries, above the limit of "
                f"{MAX_FILTER_TYPES}"
            )
        for name in event_types:
            _check_event_type(name, "event_types entry")
        types = frozenset(event_types)
    task_id = optional_str(params, "task_id", ID_PATTERN)
    since = params.get("since")
    if since is not None and (
        not isinstance(since, str)
        or not STREAM_ID_PATTERN.match(since)
        or max(parse_stream_id(since)) > MAX_STREAM_ID_PART
    ):
        raise invalid(
            f"since={since!r} is not a stream id; use the id of the last event "
            "received, such as '1700000000000-0', or '0' for the whole stream"
        )
    return EventFilter(event_types=types, task_id=task_id), since


def validate_publish(params: Mapping[str, Any]) -> tuple[str, str, dict, int]:
    """Check PUBLISH parameters; return agent, event type, payload and its size."""
    reject_unknown(params, {"from_agent", "event_type", "payload"})
    from_agent = require_str(params, "from_agent", ID_PATTERN)
    event_type = params.get("event_type")
    if not isinstance(event_type, str):
        raise invalid("event_type is required and must be a string such as NOTE")
    _check_event_type(event_type, "event_type")
    if event_type.startswith(RESERVED_PREFIX):
        raise invalid(
            f"event_type {event_type!r} is reserved: {RESERVED_PREFIX}* events come "
            "only from the task lifecycle; choose another name"
        )
    payload = params.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise invalid(f"payload must be a JSON object, got {type(payload).__name__}")
    size = len(json.dumps(payload, separators=(",", ":")).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise invalid(
            f"payload is {size} bytes as JSON, above the limit of "
            f"{MAX_PAYLOAD_BYTES} bytes; send a reference to the data instead"
        )
    return from_agent, event_type, payload, size


def _check_event_type(name: str, label: str) -> None:
    if not EVENT_TYPE_PATTERN.match(name):
        excerpt = name if len(name) <= 80 else name[:80] + "..."
        raise invalid(
            f"{label} {excerpt!r} is not an event type: use 1 to 64 upper-case "
            "letters, digits and underscores, starting with a letter"
        )


class EventCommands:
    """Handlers of SUBSCRIBE, PUBLISH and EVENTS_INFO.

    Parameters:
      bus: The daemon's event bus.
      store: Task store, which appends published events.
    """

    def __init__(self, bus: EventBus, store: TaskStore) -> None:
        self.bus = bus
        self.store = store

    async def publish(self, params: dict[str, Any]) -> dict[str, Any]:
        from_agent, event_type, payload, size = validate_publish(params)
        entry_id = await asyncio.to_thread(
            self.store.append_event,
            event_type,
            payload=payload,
            from_agent=from_agent,
        )
        logger.debug(
            "Agent %s published %s (%d bytes) as event %s.",
            from_agent,
            event_type,
            size,
            entry_id,
        )
        return {"id": entry_id, "event_type": event_type}

    async def events_info(self, params: dict[str, Any]) -> dict[str, Any]:
        reject_unknown(params, set())
        return await self.bus.info()

    async def subscribe(
        self,
        request_id: Any,
        params: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Serve one SUBSCRIBE until the client leaves or must be disconnected.

        Raises ProtocolError before the acknowledgement, when the connection
        stays usable for other requests.
        """
        event_filter, since = validate_subscribe(params)
        if self.bus.last_id is None:
            raise ProtocolError(
                "UNAVAILABLE",
                "the event stream has not been read yet (is Redis up? check "
                "`ksi-supervisorctl status ksi:redis`); retry in a few seconds",
            )
        subscription = self.bus.subscription(event_filter)
        if since is None:
            last_id = self.bus.register(subscription)
            sent = parse_stream_id(last_id or "0-0")
            ack = {"subscribed": True, "since": None, "last_id": last_id}
        else:
            trimmed = await self.bus.trimmed_after(since)
            ack = {
                "subscribed": True,
                "since": since,
                "last_id": self.bus.last_id,
                "trimmed": trimmed,
            }
            sent = parse_stream_id(since)
        ack["event_types"] = sorted(event_filter.event_types or [])
        ack["task_id"] = event_filter.task_id
        writer.write(ok_reply(request_id, ack))
        logger.debug("Subscriber joined (%s).", event_filter.describe())

        try:
            reason = await self._serve(subscription, since, sent, reader, writer)
            if reason == "slow":
                await self._disconnect_slow(request_id, event_filter, writer)
            elif reason == "shutdown":
                message = subscription.close_reason
                await _close_with(
                    writer,
                    error_reply(request_id, "SHUTTING_DOWN", message),
                    timeout_s=SHUTDOWN_CLOSE_TIMEOUT_S,
                )
            elif reason.startswith("Redis error"):
                logger.warning(
                    "Subscriber (%s) disconnected: %s.", event_filter.describe(), reason
                )
                message = (
                    f"{reason}; reconnect with since set to the id of the last "
                    "event received"
                )
                await _close_with(
                    writer, error_reply(request_id, "UNAVAILABLE", message)
                )
        finally:
            # Last of all, so the bus's stop waits until the reason is sent.
            self.bus.unsubscribe(subscription)
        logger.debug("Subscriber left (%s): %s.", event_filter.describe(), reason)

    async def _serve(
        self,
        subscription: Subscription,
        since: str | None,
        sent: StreamId,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> str:
        """Replay if asked, then stream; return why the subscription ended."""
        try:
            if since is not None:
                sent = await self._replay(subscription, since, writer)
            return await self._stream(subscription, sent, reader, writer)
        except TimeoutError:
            return "slow"
        except ConnectionError as error:
            return f"connection lost ({type(error).__name__})"
        except redis.RedisError as error:
            return f"Redis error: {error}"

    async def _disconnect_slow(
        self, request_id: Any, event_filter: EventFilter, writer: asyncio.StreamWriter
    ) -> None:
        self.bus.slow_disconnects += 1
        logger.warning(
            "Subscriber (%s) fell %d events behind; disconnected.",
            event_filter.describe(),
            self.bus.queue_events,
        )
        message = (
            f"subscriber fell {self.bus.queue_events} events behind and is "
            "disconnected; read faster, filter by event_types or task_id, and "
            "reconnect with since set to the id of the last event received"
        )
        await _close_with(writer, error_reply(request_id, "SLOW_SUBSCRIBER", message))

    async def _replay(
        self, subscription: Subscription, since: str, writer: asyncio.StreamWriter
    ) -> StreamId:
        """Send the stored events after ``since``, then join the live stream.

        Most of the backlog is sent before the subscription is registered, so
        a long replay cannot overflow its queue. After registering, the stream
        is read once more from the last id sent, to cover events appended in
        between; an event that arrives both ways is sent once, by id. Returns
        the id of the last stored event read.
        """
        after = await self._send_backlog(subscription.filter, since, writer)
        self.bus.register(subscription)
        after = await self._send_backlog(subscription.filter, after, writer)
        return parse_stream_id(after)

    async def _send_backlog(
        self, event_filter: EventFilter, after: str, writer: asyncio.StreamWriter
    ) -> str:
        """Send every stored event after ``after``; return the last id read."""
        more = True
        while more:
            events, after, more = await self.bus.replay(after)
            lines = [event.line for event in events if event_filter.matches(event)]
            if lines:
                writer.write(b"".join(lines))
                await asyncio.wait_for(writer.drain(), REPLAY_DRAIN_TIMEOUT_S)
        return after

    async def _stream(
        self,
        subscription: Subscription,
        sent: StreamId,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> str:
        """Send live events until the client leaves, lags or the bus stops."""
        pump = asyncio.create_task(_pump(subscription, sent, writer))
        left = asyncio.create_task(_wait_for_eof(reader))
        overflowed = asyncio.create_task(subscription.overflowed.wait())
        closed = asyncio.create_task(subscription.closed.wait())
        waits = {pump, left, overflowed, closed}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if left.done() and not left.cancelled():
            return "client closed the connection"
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            return f"connection lost ({type(pump.exception()).__name__})"
        if overflowed.done() and not overflowed.cancelled():
            return "slow"
        return "shutdown"


async def _pump(
    subscription: Subscription, sent: StreamId, writer: asyncio.StreamWriter
) -> None:
    """Write queued batches as they come, skipping events replay already sent."""
    while True:
        batches = await subscription.take()
        if batches[-1].last_id <= sent:
            continue
        if len(batches) == 1 and batches[0].events[0].id > sent:
            data = batches[0].data  # the bytes shared with other subscribers
        else:
            data = b"".join(
                event.line
                for batch in batches
                for event in batch.events
                if event.id > sent
            )
        sent = batches[-1].last_id
        writer.write(data)
        await writer.drain()


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def _close_with(
    writer: asyncio.StreamWriter, line: bytes, *, timeout_s: float = CLOSE_TIMEOUT_S
) -> None:
    """Send a last line and close; drop the connection if it is not read."""
    writer.write(line)
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout_s)
    except TimeoutError:
        writer.transport.abort()
    except ConnectionError:
        pass
