"""Output of ``ksi`` about tasks and events: rich renderables for a
terminal, plain one-line text for pipes and files."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

#: Lines of Claude's latest text shown under a running task.
TEXT_TAIL_LINES = 8

#: Characters of a published payload shown in a one-line event summary.
PAYLOAD_CHARS = 200

STATUS_STYLES = {
    "queued": "cyan",
    "running": "bold blue",
    "retrying": "yellow",
    "succeeded": "bold green",
    "failed": "bold red",
    "timed_out": "bold red",
    "cancelled": "magenta",
}

EVENT_STYLES = {
    "TASK_QUEUED": "cyan",
    "TASK_STARTED": "blue",
    "TASK_PROGRESS": "dim",
    "TASK_RETRYING": "yellow",
    "TASK_COMPLETED": "green",
    "TASK_FAILED": "red",
    "TASK_CANCELLED": "magenta",
}


def event_summary(event: dict[str, Any]) -> str:
    """Return the part of an event's line that depends on its type."""
    payload = event.get("payload") or {}
    kind = event.get("event_type")
    if kind == "TASK_PROGRESS":
        tools = ",".join(payload.get("tools") or []) or "-"
        return (
            f"turn {payload.get('turn', 0)}, tools {tools}, "
            f"{payload.get('input_tokens', 0)} tokens in, "
            f"{payload.get('output_tokens', 0)} out"
        )
    if kind == "TASK_STARTED":
        return f"worker {payload.get('worker_id') or payload.get('worker_pid') or '?'}"
    if kind == "TASK_RETRYING":
        return (
            f"retry in {payload.get('delay_s', 0):g} s "
            f"({payload.get('error_class') or 'error'})"
        )
    if kind in ("TASK_COMPLETED", "TASK_FAILED", "TASK_CANCELLED"):
        detail = payload.get("error") or payload.get("reason") or ""
        return f"{payload.get('status', '')} {detail}".strip()
    if kind == "TASK_QUEUED":
        return ""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    if len(text) > PAYLOAD_CHARS:
        text = text[:PAYLOAD_CHARS] + "..."
    agent = event.get("from_agent")
    return f"from {agent} {text}" if agent else text


def event_line(event: dict[str, Any]) -> str:
    """Return one plain line describing an event."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.get("ts") or 0))
    task = event.get("task_id") or "-"
    attempt = event.get("attempt") or 0
    return (
        f"{event.get('id')} {clock} {event.get('event_type'):<15} {task} "
        f"#{attempt} {event_summary(event)}"
    ).rstrip()


def event_text(event: dict[str, Any]) -> Text:
    """Return an event's line styled for a terminal."""
    style = EVENT_STYLES.get(event.get("event_type") or "", "bold")
    return Text(event_line(event), style=style)


class TaskView:
    """The live view of one task that ``ksi submit --wait`` shows.

    Parameters:
      task_id: Id of the task.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.status = "queued"
        self.attempt = 0
        self.detail = ""
        self.progress: dict[str, Any] = {}
        self.started = time.monotonic()

    def update(self, event: dict[str, Any]) -> None:
        payload = event.get("payload") or {}
        kind = event.get("event_type")
        self.attempt = event.get("attempt") or self.attempt
        if kind == "TASK_QUEUED":
            self.status = "queued"
        elif kind == "TASK_STARTED":
            self.status = "running"
            self.progress = {}
        elif kind == "TASK_PROGRESS":
            self.status = "running"
            self.progress = payload
        elif kind == "TASK_RETRYING":
            self.status = "retrying"
            self.detail = event_summary(event)
        elif kind in ("TASK_COMPLETED", "TASK_FAILED", "TASK_CANCELLED"):
            self.status = payload.get("status") or kind.removeprefix("TASK_").lower()
            self.detail = payload.get("error") or ""

    def render(self) -> RenderableType:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("task", self.task_id)
        status = Text(self.status, style=STATUS_STYLES.get(self.status, ""))
        if self.detail:
            status.append(f"  {self.detail}", style="dim")
        grid.add_row("status", status)
        grid.add_row("attempt", str(self.attempt))
        grid.add_row("elapsed", f"{time.monotonic() - self.started:.0f} s")
        progress = self.progress
        if progress:
            grid.add_row("turn", str(progress.get("turn", 0)))
            tools = ", ".join(progress.get("tools") or []) or "-"
            grid.add_row("tools", f"{tools} ({progress.get('tool_calls', 0)} calls)")
            grid.add_row(
                "tokens",
                f"{progress.get('input_tokens', 0)} in, "
                f"{progress.get('output_tokens', 0)} out",
            )
        parts: list[RenderableType] = [grid]
        text = str(progress.get("text") or "")
        if text:
            tail = "\n".join(text.splitlines()[-TEXT_TAIL_LINES:])
            parts.append(Panel(tail, title="Claude", title_align="left"))
        return Group(*parts)


def tasks_table(tasks: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    # Task ids are never cut, so they can be copied into other commands.
    table.add_column("task", no_wrap=True, min_width=32)
    for name in ("status", "attempt", "created", "elapsed s", "error"):
        table.add_column(name)
    for record in tasks:
        status = record.get("status", "")
        created = record.get("created_at")
        table.add_row(
            record.get("task_id", ""),
            Text(status, style=STATUS_STYLES.get(status, "")),
            str(record.get("attempt", 0)),
            time.strftime("%m-%d %H:%M:%S", time.localtime(created)) if created else "",
            "" if record.get("elapsed_s") is None else f"{record['elapsed_s']:.1f}",
            str(record.get("error_class") or ""),
        )
    return table


def queues_table(queues: dict[str, dict[str, Any]]) -> Table:
    """Return one row per queue and one column per state it reports."""
    states: list[str] = []
    for depth in queues.values():
        states += [state for state in depth if state not in states]
    table = Table(box=None, header_style="bold")
    table.add_column("queue")
    for state in states:
        table.add_column(state, justify="right")
    for queue, depth in queues.items():
        table.add_row(queue, *(str(depth.get(state, "")) for state in states))
    return table


def queue_lines(queues: dict[str, dict[str, Any]]) -> list[str]:
    """Return one plain line per queue: its name, then state=count pairs."""
    return [
        f"{queue} " + " ".join(f"{state}={count}" for state, count in depth.items())
        for queue, depth in queues.items()
    ]
