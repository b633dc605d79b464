"""TASK_PROGRESS events from the CLI's stream-json lines."""

from __future__ import annotations

import json
from typing import Any

import redis

from ksi_worker.progress import MAX_TEXT_CHARS, ProgressReporter, ProgressTracker


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _assistant(message_id: str, *blocks: dict, input_tokens=100, output_tokens=1):
    return _line(
        {
            "type": "assistant",
            "message": {
                "id": message_id,
                "model": "claude-sonnet-5",
                "content": list(blocks),
                "usage": {
                    "input_tokens": input_tokens,
                    "cache_read_input_tokens": 10,
                    "output_tokens": output_tokens,
                },
            },
        }
    )


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _tool(name: str) -> dict:
    return {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}


INIT = _line({"type": "system", "subtype": "init", "session_id": "s"})
TOOL_RESULT = _line({"type": "user", "message": {"role": "user", "content": []}})
RESULT = _line(
    {
        "type": "result",
        "num_turns": 2,
        "result": "done",
        "usage": {"input_tokens": 500, "output_tokens": 42},
    }
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def append_event(self, event_type, *, task_id=None, attempt=0, payload=None):
        self.events.append(
            {
                "event_type": str(event_type),
                "task_id": task_id,
                "attempt": attempt,
                "payload": payload,
            }
        )
        return f"{len(self.events)}-0"


class FailingSink:
    def __init__(self) -> None:
        self.calls = 0

    def append_event(self, *args, **kwargs):
        self.calls += 1
        raise redis.ConnectionError("Redis went away")


def test_tracker_counts_turns_tools_and_tokens():
    tracker = ProgressTracker()
    tracker.observe(INIT)
    tracker.observe(_assistant("m1", _text("Looking."), output_tokens=5))
    tracker.observe(_assistant("m1", _tool("Bash"), output_tokens=9))
    tracker.observe(TOOL_RESULT)
    tracker.observe(_assistant("m2", _text("All done."), input_tokens=200))
    assert tracker.turn == 2
    assert tracker.tools == ["Bash"]
    assert tracker.tool_calls == 1
    assert tracker.text == "Looking.\nAll done."
    # m1 counted once with its latest usage (110 in, 9 out), m2 (210 in, 1 out).
    assert tracker.input_tokens == 320
    assert tracker.output_tokens == 10


def test_tracker_takes_totals_from_result_line():
    tracker = ProgressTracker()
    tracker.observe(_assistant("m1", _text("x")))
    assert tracker.observe(RESULT) == (True, True)
    assert tracker.turn == 2
    assert tracker.input_tokens == 500
    assert tracker.output_tokens == 42


def test_tracker_keeps_latest_text_only():
    tracker = ProgressTracker()
    tracker.observe(_assistant("m1", _text("a" * MAX_TEXT_CHARS)))
    tracker.observe(_assistant("m2", _text("tail end")))
    assert len(tracker.text) == MAX_TEXT_CHARS
    assert tracker.text.endswith("\ntail end")
    assert tracker.text_chars == MAX_TEXT_CHARS + len("tail end")


def test_tracker_ignores_non_json_and_synthetic_turns():
    tracker = ProgressTracker()
    assert tracker.observe(b"warning: not json\n") == (False, False)
    assert tracker.observe(b"[1, 2]\n") == (False, False)
    synthetic = json.loads(_assistant("e1", _text("API Error: 500")))
    synthetic["message"]["model"] = "<synthetic>"
    tracker.observe(_line(synthetic))
    assert tracker.turn == 0
    assert tracker.text == "API Error: 500"


def test_reporter_throttles_within_a_turn():
    sink, clock = RecordingSink(), FakeClock()
    reporter = ProgressReporter(sink, "t1", 1, min_interval_s=0.5, clock=clock)
    reporter.on_line(INIT)
    reporter.on_line(_assistant("m1", _text("one")))
    clock.now = 0.1
    reporter.on_line(_assistant("m2", _text("two")))
    clock.now = 0.2
    reporter.on_line(_assistant("m3", _text("three")))
    assert [event["payload"]["turn"] for event in sink.events] == [1]

    clock.now = 0.7
    reporter.on_line(_assistant("m4", _text("four")))
    assert [event["payload"]["turn"] for event in sink.events] == [1, 4]


def test_reporter_sends_turn_ends_at_once():
    sink, clock = RecordingSink(), FakeClock()
    reporter = ProgressReporter(sink, "t1", 3, min_interval_s=0.5, clock=clock)
    reporter.on_line(_assistant("m1", _text("checking")))
    clock.now = 0.01
    reporter.on_line(_assistant("m1", _tool("Read")))
    clock.now = 0.02
    reporter.on_line(TOOL_RESULT)
    clock.now = 0.03
    reporter.on_line(RESULT)
    payloads = [event["payload"] for event in sink.events]
    assert [p["turn_end"] for p in payloads] == [False, True, True]
    assert payloads[1]["tools"] == ["Read"]
    assert payloads[2]["output_tokens"] == 42
    assert {event["event_type"] for event in sink.events} == {"TASK_PROGRESS"}
    assert {event["task_id"] for event in sink.events} == {"t1"}
    assert {event["attempt"] for event in sink.events} == {3}


def test_reporter_sends_nothing_without_change():
    sink = RecordingSink()
    reporter = ProgressReporter(sink, "t1", 1)
    reporter.on_line(INIT)
    reporter.on_line(TOOL_RESULT)
    assert sink.events == []


def test_reporter_survives_redis_errors():
    sink, clock = FailingSink(), FakeClock()
    reporter = ProgressReporter(sink, "t1", 1, clock=clock)
    reporter.on_line(_assistant("m1", _text("one")))
    clock.now = 1.0
    reporter.on_line(_assistant("m2", _text("two")))
    assert sink.calls == 2
    assert reporter.failures == 2
    assert reporter.sent == 0
