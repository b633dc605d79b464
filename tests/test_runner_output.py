"""The runner's line callback and its no-output (idle) limit."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

from ksi_worker.proctree import MARKER_TASK_ID, find_task_processes
from ksi_worker.runner import run_claude


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _env(task_id: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], MARKER_TASK_ID: task_id}


def test_on_line_gets_each_line_as_it_comes(tmp_path):
    argv = _script(
        tmp_path,
        """
        import sys, time
        for n in range(3):
            print("line", n, flush=True)
            time.sleep(0.3)
        """,
    )
    seen: list[tuple[bytes, float]] = []
    started = time.monotonic()
    run = run_claude(
        argv,
        "",
        task_id="t-lines",
        cwd=tmp_path,
        env=_env("t-lines"),
        timeout_s=30,
        kill_grace_s=1,
        on_line=lambda line: seen.append((line, time.monotonic() - started)),
    )
    assert [line for line, _ in seen] == [b"line 0\n", b"line 1\n", b"line 2\n"]
    # Lines arrive while the child runs, not all at its exit.
    assert seen[0][1] < seen[2][1] - 0.4
    assert run.stdout == b"line 0\nline 1\nline 2\n"


def test_failing_on_line_keeps_output_whole(tmp_path):
    argv = _script(
        tmp_path,
        """
        for n in range(1000):
            print("x" * 100, n)
        """,
    )
    calls = []

    def explode(line: bytes) -> None:
        calls.append(line)
        raise RuntimeError("callback bug")

    run = run_claude(
        argv,
        "",
        task_id="t-explode",
        cwd=tmp_path,
        env=_env("t-explode"),
        timeout_s=30,
        kill_grace_s=1,
        on_line=explode,
    )
    assert run.returncode == 0
    assert len(calls) == 1
    assert run.stdout.count(b"\n") == 1000


def test_idle_timeout_kills_silent_child_and_tree(tmp_path):
    argv = _script(
        tmp_path,
        """
        import subprocess, time
        print("init", flush=True)
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        time.sleep(300)
        """,
    )
    started = time.monotonic()
    run = run_claude(
        argv,
        "",
        task_id="t-idle",
        cwd=tmp_path,
        env=_env("t-idle"),
        timeout_s=60,
        kill_grace_s=1,
        idle_timeout_s=1.5,
    )
    elapsed = time.monotonic() - started
    assert run.stopped_by == "idle_timeout"
    assert 1.5 <= elapsed < 15
    assert run.stdout == b"init\n"
    assert find_task_processes("t-idle") == []


def test_idle_timeout_spares_child_that_keeps_printing(tmp_path):
    argv = _script(
        tmp_path,
        """
        import time
        for n in range(8):
            print(n, flush=True)
            time.sleep(0.25)
        """,
    )
    run = run_claude(
        argv,
        "",
        task_id="t-busy",
        cwd=tmp_path,
        env=_env("t-busy"),
        timeout_s=60,
        kill_grace_s=1,
        idle_timeout_s=1.0,
    )
    assert run.stopped_by is None
    assert run.returncode == 0
