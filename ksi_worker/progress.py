"""TASK_PROGRESS events from the Claude CLI's ``stream-json`` output.

With ``--output-format stream-json --verbose`` the CLI prints one JSON object
a line: a ``system`` init line, one ``assistant`` line per content block of
each model response (text or ``tool_use``), ``user`` lines carrying tool
results, and a closing ``result`` line. :class:`ProgressTracker` folds those
lines into a summary; :class:`ProgressReporter` appends that summary to the
event stream, at most once per ``min_interval_s`` and at once when a turn
ends (a tool call or the result line).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from .lifecycle import EventType

logger = logging.getLogger(__name__)

#: Shortest gap between two TASK_PROGRESS events of one task, in seconds.
#: A turn end is sent at once, whatever the gap.
MIN_INTERVAL_S = 0.5

#: Characters of Claude's text kept in a payload: the latest ones.
MAX_TEXT_CHARS = 2000

#: Distinct tool names kept in a payload, in order of first use.
MAX_TOOL_NAMES = 50

#: Model name the CLI gives the assistant messages it makes up to report an
#: API error; they are not model turns.
SYNTHETIC_MODEL = "<synthetic>"


class EventSink(Protocol):
    def append_event(
        self,
        event_type: str,
        *,
        task_id: str | None = None,
        attempt: int = 0,
        payload: Mapping[str, Any] | None = None,
    ) -> str: ...


@dataclass
class ProgressTracker:
    """Summary of one CLI run, updated one ``stream-json`` line at a time."""

    turn: int = 0
    tools: list[str] = field(default_factory=list)
    tool_calls: int = 0
    text: str = ""
    text_chars: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    #: Token usage of each model response by message id; a response spans
    #: several lines that repeat its usage.
    _usage: dict[str, tuple[int, int]] = field(default_factory=dict)

    def observe(self, line: bytes) -> tuple[bool, bool]:
        """Fold one output line in; return (summary changed, turn ended)."""
        try:
            message = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False, False
        if not isinstance(message, dict):
            return False, False
        kind = message.get("type")
        if kind == "assistant":
            return self._observe_assistant(message.get("message"))
        if kind == "result":
            self._observe_result(message)
            return True, True
        return False, False

    def payload(self, *, turn_end: bool) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "tools": list(self.tools),
            "tool_calls": self.tool_calls,
            "text": self.text,
            "text_chars": self.text_chars,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "turn_end": turn_end,
        }

    def _observe_assistant(self, message: Any) -> tuple[bool, bool]:
        if not isinstance(message, dict):
            return False, False
        message_id = str(message.get("id") or "")
        synthetic = message.get("model") == SYNTHETIC_MODEL
        if message_id and not synthetic and message_id not in self._usage:
            self.turn += 1
        if message_id and not synthetic:
            self._usage[message_id] = _token_counts(message.get("usage"))
            self.input_tokens = sum(used[0] for used in self._usage.values())
            self.output_tokens = sum(used[1] for used in self._usage.values())

        turn_ended = False
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                self._add_text(str(block.get("text") or ""))
            elif block.get("type") == "tool_use":
                # The CLI runs the tool after this line, which may take long,
                # so the turn's summary goes out now.
                self._add_tool(str(block.get("name") or "?"))
                turn_ended = True
        return True, turn_ended

    def _observe_result(self, result: dict[str, Any]) -> None:
        if isinstance(result.get("num_turns"), int):
            self.turn = result["num_turns"]
        usage = result.get("usage")
        if isinstance(usage, dict):
            self.input_tokens, self.output_tokens = _token_counts(usage)

    def _add_text(self, text: str) -> None:
        if not text:
            return
        joined = f"{self.text}\n{text}" if self.text else text
        self.text = joined[-MAX_TEXT_CHARS:]
        self.text_chars += len(text)

    def _add_tool(self, name: str) -> None:
        self.tool_calls += 1
        if name not in self.tools and len(self.tools) < MAX_TOOL_NAMES:
            self.tools.append(name)


def _token_counts(usage: Any) -> tuple[int, int]:
    """Return (input tokens with cache reads and writes, output tokens)."""
    if not isinstance(usage, dict):
        return 0, 0

    def count(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) else 0

    input_tokens = (
        count("input_tokens")
        + count("cache_creation_input_tokens")
        + count("cache_read_input_tokens")
    )
    return input_tokens, count("output_tokens")


class ProgressReporter:
    """Appends TASK_PROGRESS events for one attempt of a task.

    Pass :meth:`on_line` to the runner, which calls it from its stdout reader
    thread with each line the CLI prints.

    Parameters:
      sink: Where events go, normally the task store.
      task_id: Id of the task.
      attempt: Attempt number, copied into each event.
      min_interval_s: Shortest gap between two events that are not turn ends.
      clock: Monotonic clock in seconds, replaceable in tests.
    """

    def __init__(
        self,
        sink: EventSink,
        task_id: str,
        attempt: int,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.task_id = task_id
        self.attempt = attempt
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.tracker = ProgressTracker()
        self.sent = 0
        self.failures = 0
        self._pending = False
        self._last_sent: float | None = None

    def on_line(self, line: bytes) -> None:
        changed, turn_ended = self.tracker.observe(line)
        self._pending = self._pending or changed
        if not self._pending:
            return
        now = self.clock()
        due = self._last_sent is None or now - self._last_sent >= self.min_interval_s
        if turn_ended or due:
            self._send(now, turn_end=turn_ended)

    def _send(self, now: float, *, turn_end: bool) -> None:
        self._pending = False
        self._last_sent = now
        try:
            self.sink.append_event(
                EventType.TASK_PROGRESS,
                task_id=self.task_id,
                attempt=self.attempt,
                payload=self.tracker.payload(turn_end=turn_end),
            )
        except redis.RedisError as error:
            # Progress is advisory: the task goes on, and only the first
            # failure of an attempt is logged.
            self.failures += 1
            if self.failures == 1:
                logger.warning(
                    "Task %s attempt %d: progress event not written (%s); "
                    "the task goes on.",
                    self.task_id,
                    self.attempt,
                    error,
                )
            return
        self.sent += 1
