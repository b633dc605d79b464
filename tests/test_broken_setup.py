"""Broken setups fail clearly: a missing Claude CLI, an unusable KSI_HOME and a
taken metrics port each give one message that names the value and the fix.

A Redis that starts late is covered by test_redis_late_start.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bundle import BIN, Bundle
from tests.faults import program_infos

MISSING_CLI = "/nonexistent/claude"
#: startretries of [program:metrics] in deploy/supervisord.conf.
METRICS_START_RETRIES = 3
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds, listening, for the module."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def broken_bundle(stub_api, taken_port) -> Iterator[Bundle]:
    """A bundle whose Claude CLI is missing and whose metrics port is taken."""
    bundle = Bundle(
        {
            "ANTHROPIC_BASE_URL": stub_api,
            "ANTHROPIC_API_KEY": "stub-key",
            "KSI_CLAUDE_BIN": MISSING_CLI,
            "KSI_METRICS_ADDR": f"127.0.0.1:{taken_port}",
            "KSI_WORKERS": "1",
        }
    )
    try:
        subprocess.run([BIN / "ksi-supervisord"], env=bundle.env, check=True)
        _wait_state(bundle, "ksi:metrics", "FATAL", timeout_s=60)
        expected = bundle.expected_programs() - {"ksi:metrics"}
        _wait_running(bundle, expected, timeout_s=60)
        yield bundle
    finally:
        left = bundle.stop()
        bundle.cleanup()
        assert left == []


def _wait_state(bundle: Bundle, program: str, state: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if program_infos(bundle.home)[program]["statename"] == state:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"{program} is not {state}\n{bundle.logs_tail()}")


def _wait_running(bundle: Bundle, programs: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = {n: i["statename"] for n, i in program_infos(bundle.home).items()}
        if all(states.get(name) == "RUNNING" for name in programs):
            with bundle.client() as client:
                if client.request("HEALTH_CHECK").get("live_workers"):
                    return
        time.sleep(0.25)
    raise AssertionError(f"programs not running\n{bundle.logs_tail()}")


def _health(bundle: Bundle) -> dict:
    with bundle.client() as client:
        return client.request("HEALTH_CHECK")


@pytest.mark.bundle
def test_missing_claude_fails_task_at_once(broken_bundle):
    worker_pid = program_infos(broken_bundle.home)["ksi:worker_00"]["pid"]
    started = time.monotonic()
    with broken_bundle.client() as client:
        task_id = client.request("QUEUE_TASK", prompt="hello")["task_id"]
        record = client.request("TASK_STATUS", task_id=task_id)
        while record["status"] not in TERMINAL:
            assert time.monotonic() - started < 20, record
            time.sleep(0.1)
            record = client.request("TASK_STATUS", task_id=task_id)
    print(f"\ntask failed {time.monotonic() - started:.1f} s after QUEUE_TASK")
    assert record["status"] == "failed"
    assert record["error_class"] == "claude_missing"
    assert record["attempt"] == 1
    assert MISSING_CLI in record["error"]
    assert "KSI_CLAUDE_BIN" in record["error"]
    info = program_infos(broken_bundle.home)["ksi:worker_00"]
    assert info["statename"] == "RUNNING"
    assert info["pid"] == worker_pid


@pytest.mark.bundle
def test_missing_claude_in_health_check(broken_bundle):
    report = _health(broken_bundle)
    problems = [p for p in report["problems"] if MISSING_CLI in p]
    assert report["status"] == "degraded"
    assert len(problems) == 1
    assert "KSI_CLAUDE_BIN" in problems[0]
    assert "scripts/setup" in problems[0]


@pytest.mark.bundle
def test_taken_metrics_port_ends_fatal(broken_bundle, taken_port):
    addr = f"127.0.0.1:{taken_port}"
    time.sleep(3)
    assert program_infos(broken_bundle.home)["ksi:metrics"]["statename"] == "FATAL"
    log = (broken_bundle.home / "log" / "metrics.log").read_text()
    errors = [line for line in log.splitlines() if "Cannot listen" in line]
    assert "Traceback" not in log
    assert len(errors) == METRICS_START_RETRIES + 1
    assert all(addr in line and "KSI_METRICS_ADDR" in line for line in errors)
    problems = [p for p in _health(broken_bundle)["problems"] if "ksi:metrics" in p]
    assert len(problems) == 1
    assert "FATAL" in problems[0]
    assert "metrics.log" in problems[0]


def _supervisord(home: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KSI_HOME": home}
    return subprocess.run(
        [BIN / "ksi-supervisord"], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ("home is a file", "{home} is a file"),
        ("parent is a file", "a part of {home}"),
        ("log is a file", "{home}/log is a file"),
    ],
)
def test_unusable_home_one_line_error(layout, named):
    root = Path(tempfile.mkdtemp(prefix="ksi-home-", dir="/tmp"))
    try:
        if layout == "home is a file":
            home = root / "home"
            home.touch()
        elif layout == "parent is a file":
            (root / "file").touch()
            home = root / "file" / "home"
        else:
            home = root / "home"
            home.mkdir()
            (home / "log").touch()
        done = _supervisord(str(home))
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"ksi-supervisord: KSI_HOME={home} cannot be used")
    assert named.format(home=home) in lines[0]
    assert "Set KSI_HOME to a folder" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_read_only_parent_one_line_error():
    root = Path(tempfile.mkdtemp(prefix="ksi-home-", dir="/tmp"))
    root.chmod(0o500)
    try:
        done = _supervisord(str(root / "home"))
    finally:
        root.chmod(0o700)
        root.rmdir()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "Permission denied" in done.stderr
    assert "Set KSI_HOME to a folder" in done.stderr
