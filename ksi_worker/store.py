"""Task records and the event stream in Redis.

A task record is a Redis hash whose values are JSON. Every state change of a
task goes through :meth:`TaskStore.transition`, a Lua script that checks the
current state, writes the new fields and appends the event in one step, so a
task reaches exactly one terminal state even when a cancel races a finish.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from . import keys
from .lifecycle import EventType, TaskStatus

logger = logging.getLogger(__name__)

# KEYS: task hash, event stream, index of running tasks.
# ARGV, in order:
#   - allowed current statuses (space-separated JSON strings);
#   - stream maxlen;
#   - 1 to increment the attempt counter;
#   - the task id;
#   - number of required field pairs, then those pairs (field, JSON value);
#   - number of field pairs to write, then those pairs;
#   - the event's field pairs.
# The event's "attempt" field is filled in here, so it matches the record.
_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then
    return {0, false, 0}
end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. current .. ' ', 1, true) then
    return {0, current, tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')}
end
local nrequired = tonumber(ARGV[5])
local index = 6
for i = index, index + 2 * nrequired - 1, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
        return {0, current, tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')}
    end
end
index = index + 2 * nrequired
if ARGV[3] == '1' then
    redis.call('HINCRBY', KEYS[1], 'attempt', 1)
end
local nfields = tonumber(ARGV[index])
index = index + 1
if nfields > 0 then
    redis.call('HSET', KEYS[1], unpack(ARGV, index, index + 2 * nfields - 1))
end
index = index + 2 * nfields
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if redis.call('HGET', KEYS[1], 'status') == '"running"' then
    redis.call('SADD', KEYS[3], ARGV[4])
else
    redis.call('SREM', KEYS[3], ARGV[4])
end
local event = {}
for i = index, #ARGV do
    table.insert(event, ARGV[i])
end
table.insert(event, 'attempt')
table.insert(event, tostring(attempt))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(event))
return {1, current, attempt}
"""

#: Record fields never returned to clients.
PRIVATE_FIELDS = frozenset({"prompt"})


def new_task_id() -> str:
    return uuid.uuid4().hex


def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def _decode(raw: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    record = {}
    for name, value in raw.items():
        if isinstance(name, bytes):
            name = name.decode()
        record[name] = json.loads(value)
    return record


def decode_event(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> dict:
    """Turn one stream entry into the event dict sent to clients."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    return {
        "id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        "event_type": text.get("event_type"),
        "task_id": text.get("task_id") or None,
        "attempt": int(text.get("attempt") or 0),
        "ts": float(text.get("ts") or 0),
        "payload": json.loads(text.get("payload") or "{}"),
        "from_agent": text.get("from_agent") or None,
    }


class TaskStore:
    """Reads and writes task records and appends lifecycle events.

    Parameters:
      client: A Redis client (``decode_responses`` off).
      events_maxlen: Approximate maximum length of the event stream.
    """

    def __init__(self, client: redis.Redis, *, events_maxlen: int = 100_000) -> None:
        self.client = client
        self.events_maxlen = events_maxlen
        self._transition = client.register_script(_TRANSITION_LUA)

    def create(
        self,
        task_id: str,
        fields: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        idempotency_ttl_s: int = 24 * 3600,
    ) -> dict[str, Any]:
        """Write a new task record in state ``queued`` and emit TASK_QUEUED.

        With ``idempotency_key``, the task is created only if the key names no
        task yet, and the record of the task it names is returned otherwise.
        The key and the record are written in one transaction, so a failure
        leaves neither and a retry with the same key creates the task.
        """
        if idempotency_key is None:
            pipe = self.client.pipeline(transaction=True)
            record = self._write_new(pipe, task_id, fields)
            pipe.execute()
            return record

        claim = keys.idempotency(idempotency_key)
        found: dict[str, Any] = {}

        def write(pipe: redis.client.Pipeline) -> None:
            found.clear()
            bound = pipe.get(claim)
            if bound is not None:
                existing = pipe.hgetall(keys.task(bound.decode()))
                if existing:
                    found.update(_decode(existing))
                    return
                # The key names a task that was never written, as a daemon that
                # claimed keys in a separate step could leave, so it is reused.
            pipe.multi()
            pipe.set(claim, task_id, ex=idempotency_ttl_s)
            found.update(self._write_new(pipe, task_id, fields))

        self.client.transaction(write, claim)
        return dict(found)

    def _write_new(
        self, pipe: redis.client.Pipeline, task_id: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Add the writes of a new queued task to ``pipe``; return its record."""
        now = time.time()
        record = {
            **fields,
            "task_id": task_id,
            "status": TaskStatus.QUEUED.value,
            "attempt": 0,
            "created_at": now,
        }
        pipe.hset(keys.task(task_id), mapping=_encode(record))
        pipe.zadd(keys.TASK_INDEX, {task_id: now})
        pipe.xadd(
            keys.EVENT_STREAM,
            self._event_fields(EventType.TASK_QUEUED, task_id, {}, attempt=0),
            maxlen=self.events_maxlen,
            approximate=True,
        )
        return record

    def get(self, task_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(keys.task(task_id))
        return _decode(raw) if raw else None

    def get_prompt(self, task_id: str) -> str | None:
        raw = self.client.hget(keys.task(task_id), "prompt")
        return json.loads(raw) if raw is not None else None

    def set_fields(self, task_id: str, fields: Mapping[str, Any]) -> None:
        """Write fields that do not change the task's state."""
        self.client.hset(keys.task(task_id), mapping=_encode(fields))

    def transition(
        self,
        task_id: str,
        *,
        allowed_from: Iterable[TaskStatus],
        fields: Mapping[str, Any],
        event_type: EventType,
        payload: Mapping[str, Any] | None = None,
        new_attempt: bool = False,
        require: Mapping[str, Any] | None = None,
    ) -> tuple[bool, TaskStatus | None, int]:
        """Apply a state change only if the task is in one of ``allowed_from``.

        ``require`` maps record fields to the values they must still hold, so
        a caller that read the record earlier changes only what it read.
        Returns whether it was applied, the status before the call (None when
        the task does not exist) and the attempt number after the call.
        """
        allowed = " ".join(json.dumps(status.value) for status in allowed_from)
        required = _encode(require or {})
        required_args = [item for pair in required.items() for item in pair]
        field_args = [item for pair in _encode(fields).items() for item in pair]
        event = self._event_fields(event_type, task_id, payload or {}, attempt=None)
        event_args = [item for pair in event.items() for item in pair]
        applied, before, attempt = self._transition(
            keys=[keys.task(task_id), keys.EVENT_STREAM, keys.RUNNING],
            args=[
                allowed,
                self.events_maxlen,
                "1" if new_attempt else "0",
                task_id,
                len(required),
                *required_args,
                len(fields),
                *field_args,
                *event_args,
            ],
        )
        status = TaskStatus(json.loads(before)) if before else None
        return bool(applied), status, int(attempt)

    def append_event(
        self,
        event_type: str,
        *,
        task_id: str | None = None,
        attempt: int = 0,
        payload: Mapping[str, Any] | None = None,
        from_agent: str | None = None,
    ) -> str:
        """Append an event to the stream and return its stream id."""
        fields = self._event_fields(event_type, task_id, payload or {}, attempt=attempt)
        if from_agent:
            fields["from_agent"] = from_agent
        entry_id = self.client.xadd(
            keys.EVENT_STREAM,
            fields,
            maxlen=self.events_maxlen,
            approximate=True,
        )
        return entry_id.decode()

    def running_task_ids(self) -> list[str]:
        return [task_id.decode() for task_id in self.client.smembers(keys.RUNNING)]

    def list(self, *, status: str | None = None, limit: int = 50) -> list[dict]:
        """Return task records newest first, optionally only those in ``status``."""
        records: list[dict] = []
        offset = 0
        page = max(limit, 100)
        while len(records) < limit:
            task_ids = self.client.zrevrange(keys.TASK_INDEX, offset, offset + page - 1)
            if not task_ids:
                break
            offset += len(task_ids)
            pipe = self.client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hgetall(keys.task(task_id.decode()))
            for raw in pipe.execute():
                if not raw:
                    continue
                record = _decode(raw)
                if status is None or record.get("status") == status:
                    records.append(public_record(record))
        return records[:limit]

    def events(self, *, after: str = "-", count: int = 1000) -> list[dict]:
        """Return up to ``count`` events with ids above ``after``, oldest first."""
        start = "-" if after == "-" else f"({after}"
        entries = self.client.xrange(keys.EVENT_STREAM, min=start, count=count)
        return [decode_event(entry_id, fields) for entry_id, fields in entries]

    @staticmethod
    def _event_fields(
        event_type: str,
        task_id: str | None,
        payload: Mapping[str, Any],
        *,
        attempt: int | None,
    ) -> dict[str, str]:
        fields = {
            "event_type": str(event_type),
            "task_id": task_id or "",
            "ts": repr(time.time()),
            "payload": json.dumps(payload),
        }
        if attempt is not None:
            fields["attempt"] = str(attempt)
        return fields


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Return a task record without the fields clients never see."""
    return {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}
