"""Follow the daemon's events from a client, surviving daemon restarts.

:class:`EventFollower` iterates over a SUBSCRIBE and, when the daemon ends
the subscription (restart, slow reader, Redis outage), subscribes again with
``since`` set to the last event received, so nothing still in the stream is
missed. :func:`wait_for_task` uses it to wait for a task's end, and polls
TASK_STATUS instead when the daemon has no SUBSCRIBE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .client import CommandError, DaemonClient, DaemonUnavailable

#: Error codes that end a subscription which a new SUBSCRIBE can resume.
RESUMABLE_CODES = frozenset({"SLOW_SUBSCRIBER", "SHUTTING_DOWN", "UNAVAILABLE"})

#: Seconds to keep trying to reach the daemon again after losing it.
RECONNECT_S = 30.0

#: Pause between two attempts to reach the daemon, in seconds.
RECONNECT_PAUSE_S = 0.5

#: Seconds between two TASK_STATUS polls when SUBSCRIBE is unavailable.
POLL_INTERVAL_S = 0.5

#: Task states after which nothing more happens to a task.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})

#: Event types written when a task reaches a terminal state.
TERMINAL_EVENT_TYPES = frozenset({"TASK_COMPLETED", "TASK_FAILED", "TASK_CANCELLED"})


class EventFollower:
    """Iterates over the events of a subscription, reconnecting when it drops.

    Parameters:
      socket_path: The daemon's socket.
      event_types: Event types to receive; None for all.
      task_id: Only events of this task; None for all.
      since: Stream id to resume after; None for events from now on.
      deadline: ``time.monotonic()`` value after which iteration raises
        TimeoutError; None waits without limit.
      reconnect_s: Seconds to keep trying to reach a daemon that went away
        before raising DaemonUnavailable.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        event_types: list[str] | None = None,
        task_id: str | None = None,
        since: str | None = None,
        deadline: float | None = None,
        reconnect_s: float = RECONNECT_S,
    ) -> None:
        self.socket_path = socket_path
        self.event_types = event_types
        self.task_id = task_id
        self.last_id = since
        self.deadline = deadline
        self.reconnect_s = reconnect_s
        self.reconnects = 0
        self.connected = False
        self.trimmed = False

    def _timeout(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining

    def connect(self) -> DaemonClient:
        """Subscribe once; return the client, ready for ``events()``."""
        client = DaemonClient(self.socket_path, timeout_s=self._timeout() or 30.0)
        try:
            ack = client.subscribe(
                event_types=self.event_types, task_id=self.task_id, since=self.last_id
            )
        except BaseException:
            client.close()
            raise
        self.connected = True
        if self.last_id is None:
            self.last_id = ack.get("last_id") or "0"
        self.trimmed = self.trimmed or bool(ack.get("trimmed"))
        return client

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lost_since: float | None = None
        while True:
            try:
                with self.connect() as client:
                    lost_since = None
                    client.sock.settimeout(self._timeout())
                    for event in client.events():
                        self.last_id = event["id"]
                        yield event
            except CommandError as error:
                if error.code not in RESUMABLE_CODES:
                    raise
                problem: Exception = error
            except DaemonUnavailable as error:
                if not self.connected:
                    raise  # never reached: no daemon to wait for
                problem = error
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since > self.reconnect_s:
                raise DaemonUnavailable(
                    f"{problem}; no daemon to resubscribe to for {self.reconnect_s:g} s"
                )
            self.reconnects += 1
            time.sleep(RECONNECT_PAUSE_S)
            self._timeout()


def wait_for_task(
    socket_path: Path,
    task_id: str,
    *,
    timeout_s: float | None = None,
    since: str | None = None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> dict[str, Any]:
    """Wait for a task to end; return its record.

    The subscription starts before the record is read, so an end that
    happens in between is seen either way. Each event of the task goes to
    ``on_event``. Raises TimeoutError after ``timeout_s`` seconds,
    CommandError when the task is not found, and DaemonUnavailable when the
    daemon stays away.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    follower = EventFollower(
        socket_path, task_id=task_id, since=since, deadline=deadline
    )
    try:
        first = follower.connect()
    except CommandError as error:
        # A daemon without SUBSCRIBE, or whose event bus cannot read Redis yet.
        if error.code != "UNKNOWN_COMMAND" and error.code not in RESUMABLE_CODES:
            raise
        return _poll_for_task(socket_path, task_id, deadline)

    with first:
        record = _status(socket_path, task_id)
        if record["status"] in TERMINAL_STATUSES:
            return record
        first.sock.settimeout(follower._timeout())
        try:
            record = _until_end(
                socket_path, task_id, first.events(), follower, on_event
            )
        except DaemonUnavailable:
            record = None
        except CommandError as error:
            if error.code not in RESUMABLE_CODES:
                raise
            record = None
    if record is not None:
        return record
    # The first subscription dropped: resume it after the last event seen.
    record = _until_end(socket_path, task_id, iter(follower), follower, on_event)
    assert record is not None, "an EventFollower never ends"
    return record


def _until_end(
    socket_path: Path,
    task_id: str,
    events: Iterator[dict[str, Any]],
    follower: EventFollower,
    on_event: Callable[[dict[str, Any]], None],
) -> dict[str, Any] | None:
    """Pass events on until the task ends; return its record, or None if the
    events stop first."""
    for event in events:
        follower.last_id = event["id"]
        on_event(event)
        if event["event_type"] in TERMINAL_EVENT_TYPES:
            record = _status(socket_path, task_id)
            # A dead letter replayed at once is queued again: keep waiting.
            if record["status"] in TERMINAL_STATUSES:
                return record
    return None


def _status(socket_path: Path, task_id: str) -> dict[str, Any]:
    with DaemonClient(socket_path) as client:
        return client.request("TASK_STATUS", task_id=task_id)


def _poll_for_task(
    socket_path: Path, task_id: str, deadline: float | None
) -> dict[str, Any]:
    """Wait for a task's end by polling TASK_STATUS, for daemons without SUBSCRIBE."""
    while True:
        record = _status(socket_path, task_id)
        if record["status"] in TERMINAL_STATUSES:
            return record
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"task {task_id} is still {record['status']}")
        time.sleep(POLL_INTERVAL_S)
