"""Run one Claude CLI process for a task and end its whole tree when it must.

The runner enforces the task's time limit itself instead of relying on
Dramatiq's TimeLimit middleware, which raises only when the worker thread next
runs Python code and so never interrupts a thread blocked on a child.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .proctree import kill_task_processes

logger = logging.getLogger(__name__)

#: Seconds between checks of the deadline and the stop request.
POLL_INTERVAL_S = 0.1

#: Bytes of the CLI's stderr kept for error messages.
STDERR_TAIL_BYTES = 16_384


@dataclass
class ClaudeRun:
    """Outcome of one CLI process.

    ``stopped_by`` is None when the process exited on its own, else the reason
    the runner ended it: ``"timeout"``, ``"idle_timeout"`` or a reason
    returned by ``should_stop``. ``stdout`` is the CLI's whole output.
    """

    returncode: int | None
    stdout: bytes
    stderr_tail: str
    elapsed_s: float
    pid: int | None
    stopped_by: str | None = None
    launch_error: str | None = None


def _write_stdin(stream, data: bytes) -> None:
    # The CLI reads stdin to end of file before it starts, so close it always.
    try:
        stream.write(data)
    except (BrokenPipeError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except (BrokenPipeError, ValueError):
            pass


class _OutputWatch:
    """Time of the CLI's latest stdout line, written by the reader thread."""

    def __init__(self) -> None:
        self.last_line_at = time.monotonic()


def _read_lines(
    stream,
    sink: list[bytes],
    watch: _OutputWatch,
    on_line: Callable[[bytes], None] | None,
    task_id: str,
) -> None:
    failed = False
    for line in iter(stream.readline, b""):
        sink.append(line)
        watch.last_line_at = time.monotonic()
        if on_line is None or failed:
            continue
        try:
            on_line(line)
        except Exception:
            # The output must still be read to its end, or the CLI blocks on
            # a full pipe; the callback is dropped for the rest of the run.
            failed = True
            logger.exception(
                "Task %s: output callback failed; no more progress is reported.",
                task_id,
            )


def _read_tail(stream, sink: deque[bytes]) -> None:
    size = 0
    for chunk in iter(lambda: stream.read1(65536), b""):
        sink.append(chunk)
        size += len(chunk)
        while size > STDERR_TAIL_BYTES and len(sink) > 1:
            size -= len(sink.popleft())


def run_claude(
    argv: Sequence[str],
    prompt: str,
    *,
    task_id: str,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
    kill_grace_s: float,
    should_stop: Callable[[], str | None] = lambda: None,
    on_line: Callable[[bytes], None] | None = None,
    idle_timeout_s: float | None = None,
) -> ClaudeRun:
    """Run the CLI with ``prompt`` on stdin until it exits or must stop.

    The child starts in a new session, so its process group is its own. On
    the deadline, after ``idle_timeout_s`` seconds without a line on stdout,
    or when ``should_stop`` returns a reason, the group and every process
    carrying the task's marker get SIGTERM, then SIGKILL after
    ``kill_grace_s``. Marked processes left behind by a child that exited on
    its own (``sleep 300 &`` from the Bash tool) are ended the same way.

    ``on_line`` is called with each stdout line, newline included, from a
    reader thread; an exception it raises stops further calls.
    """
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as error:
        return ClaudeRun(
            returncode=None,
            stdout=b"",
            stderr_tail="",
            elapsed_s=time.monotonic() - started,
            pid=None,
            launch_error=f"{argv[0]}: {error.strerror or error}",
        )

    logger.info("Task %s: started claude pid %d in %s.", task_id, process.pid, cwd)
    stdout_chunks: list[bytes] = []
    stderr_chunks: deque[bytes] = deque()
    watch = _OutputWatch()
    threads = [
        threading.Thread(
            target=_write_stdin, args=(process.stdin, prompt.encode()), daemon=True
        ),
        threading.Thread(
            target=_read_lines,
            args=(process.stdout, stdout_chunks, watch, on_line, task_id),
            daemon=True,
        ),
        threading.Thread(
            target=_read_tail, args=(process.stderr, stderr_chunks), daemon=True
        ),
    ]
    for thread in threads:
        thread.start()

    deadline = started + timeout_s
    stopped_by: str | None = None
    try:
        while True:
            try:
                process.wait(timeout=POLL_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= deadline:
                stopped_by = "timeout"
            elif (
                idle_timeout_s is not None
                and now - watch.last_line_at >= idle_timeout_s
            ):
                stopped_by = "idle_timeout"
            else:
                stopped_by = should_stop()
            if stopped_by:
                logger.warning(
                    "Task %s: stopping claude pid %d (%s) after %.1f s.",
                    task_id,
                    process.pid,
                    stopped_by,
                    time.monotonic() - started,
                )
                break
    finally:
        # Runs on normal exit, on a stop, and when the worker thread is
        # interrupted, so no tree outlives the runner.
        _end_tree(process, task_id, kill_grace_s)
        for thread in threads:
            thread.join(timeout=5)

    return ClaudeRun(
        returncode=process.returncode,
        stdout=b"".join(stdout_chunks),
        stderr_tail=b"".join(stderr_chunks).decode(errors="replace"),
        elapsed_s=time.monotonic() - started,
        pid=process.pid,
        stopped_by=stopped_by,
    )


def _end_tree(process: subprocess.Popen, task_id: str, grace_s: float) -> None:
    """SIGTERM the CLI's group and marked processes, SIGKILL them after grace.

    The CLI itself is waited for through Popen, so its exit status is kept.
    """
    deadline = time.monotonic() + grace_s
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
    leftovers = kill_task_processes(
        task_id, grace_s=grace_s, process_group=process.pid, exclude=[process.pid]
    )
    if leftovers and process.returncode is not None:
        logger.warning(
            "Task %s: killed %d leftover processes carrying its marker: pids %s.",
            task_id,
            len(leftovers),
            leftovers,
        )
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.kill()
        process.wait()


def _signal_group(process_group: int, sig: int) -> None:
    try:
        os.killpg(process_group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def child_environment(
    base: Mapping[str, str], overrides: Mapping[str, str]
) -> dict[str, str]:
    """Build the CLI's environment from an allowlist of the worker's variables."""
    allowed = {
        name: value
        for name, value in base.items()
        if name in ALLOWED_ENV or name.startswith(ALLOWED_ENV_PREFIXES)
    }
    allowed.update(overrides)
    return allowed


#: Worker variables passed to the CLI as they are.
ALLOWED_ENV = frozenset({"PATH", "LANG", "LC_ALL", "TZ", "TERM", "SHELL", "USER"})

#: Prefixes of worker variables passed to the CLI: Anthropic's own settings.
ALLOWED_ENV_PREFIXES = ("ANTHROPIC_",)
