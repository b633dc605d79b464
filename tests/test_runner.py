"""The runner: stdin, output sizes, deadlines and process-tree cleanup."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ksi_worker.proctree import MARKER_TASK_ID, find_task_processes
from ksi_worker.runner import child_environment, run_claude


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _env(task_id: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], MARKER_TASK_ID: task_id}


def test_prompt_reaches_stdin_and_stdin_closes(tmp_path):
    argv = _script(
        tmp_path,
        """
        import sys
        data = sys.stdin.buffer.read()
        print(len(data))
        """,
    )
    run = run_claude(
        argv,
        "x" * 1000,
        task_id="t-stdin",
        cwd=tmp_path,
        env=_env("t-stdin"),
        timeout_s=30,
        kill_grace_s=1,
    )
    assert run.returncode == 0
    assert run.stdout.strip() == b"1000"


def test_large_prompt_and_output_do_not_deadlock(tmp_path):
    # The child writes 2 MiB before it reads its 1 MiB of stdin: a runner that
    # wrote stdin and read stdout in one thread would block forever.
    argv = _script(
        tmp_path,
        """
        import sys
        sys.stdout.write("y" * (2 * 1024 * 1024))
        sys.stdout.flush()
        data = sys.stdin.read()
        sys.stdout.write("\\n%d\\n" % len(data))
        """,
    )
    run = run_claude(
        argv,
        "p" * (1024 * 1024),
        task_id="t-big",
        cwd=tmp_path,
        env=_env("t-big"),
        timeout_s=60,
        kill_grace_s=1,
    )
    assert run.returncode == 0
    assert run.stdout.splitlines()[-1] == str(1024 * 1024).encode()
    assert len(run.stdout) > 2 * 1024 * 1024


def test_deadline_kills_child_and_escaped_grandchild(tmp_path):
    # The grandchild starts its own session, as a tool that leaves the CLI's
    # process group would; only its marker ties it to the task.
    argv = _script(
        tmp_path,
        """
        import subprocess, time
        subprocess.Popen(["sleep", "600"], start_new_session=True)
        time.sleep(600)
        """,
    )
    started = time.monotonic()
    run = run_claude(
        argv,
        "",
        task_id="t-deadline",
        cwd=tmp_path,
        env=_env("t-deadline"),
        timeout_s=2,
        kill_grace_s=1,
    )
    elapsed = time.monotonic() - started
    assert run.stopped_by == "timeout"
    assert elapsed < 2 + 1 + 5
    assert find_task_processes("t-deadline") == []


def test_child_ignoring_sigterm_gets_sigkill(tmp_path):
    argv = _script(
        tmp_path,
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
        """,
    )
    run = run_claude(
        argv,
        "",
        task_id="t-stubborn",
        cwd=tmp_path,
        env=_env("t-stubborn"),
        timeout_s=1,
        kill_grace_s=1,
    )
    assert run.stopped_by == "timeout"
    assert run.returncode == -9
    assert find_task_processes("t-stubborn") == []


def test_leftover_background_process_is_killed_after_exit(tmp_path):
    argv = _script(
        tmp_path,
        """
        import subprocess
        subprocess.Popen(["sleep", "600"], start_new_session=True)
        print("done")
        """,
    )
    run = run_claude(
        argv,
        "",
        task_id="t-leftover",
        cwd=tmp_path,
        env=_env("t-leftover"),
        timeout_s=30,
        kill_grace_s=1,
    )
    assert run.returncode == 0
    assert run.stopped_by is None
    assert find_task_processes("t-leftover") == []


def test_should_stop_ends_run_promptly(tmp_path):
    argv = _script(tmp_path, "import time; time.sleep(600)\n")
    stop_at = time.monotonic() + 0.5
    run = run_claude(
        argv,
        "",
        task_id="t-cancel",
        cwd=tmp_path,
        env=_env("t-cancel"),
        timeout_s=60,
        kill_grace_s=1,
        should_stop=lambda: "cancel" if time.monotonic() > stop_at else None,
    )
    assert run.stopped_by == "cancel"
    assert run.elapsed_s < 3


def test_missing_binary_reports_launch_error(tmp_path):
    run = run_claude(
        [str(tmp_path / "no-such-claude")],
        "",
        task_id="t-missing",
        cwd=tmp_path,
        env=_env("t-missing"),
        timeout_s=5,
        kill_grace_s=1,
    )
    assert run.launch_error is not None
    assert "no-such-claude" in run.launch_error


def test_unmarked_process_survives_cleanup(tmp_path):
    decoy = psutil.Popen(["sleep", "60"])
    try:
        argv = _script(tmp_path, "print('ok')\n")
        run_claude(
            argv,
            "",
            task_id="t-decoy",
            cwd=tmp_path,
            env=_env("t-decoy"),
            timeout_s=5,
            kill_grace_s=1,
        )
        assert decoy.is_running()
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.parametrize(
    "name", ["AWS_SECRET_ACCESS_KEY", "KSI_REDIS_URL", "PYTHONPATH"]
)
def test_child_environment_drops_other_variables(name):
    env = child_environment({name: "x", "PATH": "/bin", "ANTHROPIC_API_KEY": "k"}, {})
    assert name not in env
    assert env["ANTHROPIC_API_KEY"] == "k"
