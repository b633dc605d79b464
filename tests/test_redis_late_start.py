"""A bundle whose Redis responds only 30 s after supervisord starts.

The bundle's programs use ``KSI_REDIS_URL``, here a unix socket of a
redis-server that the test starts 30 s late. Every program connects through
that URL, so they all start against a Redis that does not answer yet, without
a hook in the code and without racing supervisord's own start of ksi:redis.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from daemon.client import DaemonClient, DaemonUnavailable
from tests.bundle import BIN, Bundle, free_port
from tests.faults import StateRecorder, program_infos

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(240)]

WORKERS = 2
#: Seconds between supervisord's start and Redis responding.
REDIS_DELAY_S = 30
#: Seconds within which every worker must run once Redis responds.
RECOVERY_LIMIT_S = 15


def _start_redis(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(folder / "redis.sock"),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=(folder / "redis.log").open("wb"),
    )


def _health(bundle: Bundle) -> dict | None:
    try:
        with DaemonClient(bundle.home / "run" / "ksi.sock", timeout_s=10) as client:
            return client.request("HEALTH_CHECK")
    except (DaemonUnavailable, OSError):
        return None


def test_late_redis_start(stub_api, claude_bin):
    folder = Path(tempfile.mkdtemp(prefix="ksi-late-", dir="/tmp"))
    redis_url = f"unix://{folder / 'redis.sock'}?db=0"
    bundle = Bundle(
        {
            "ANTHROPIC_BASE_URL": stub_api,
            "ANTHROPIC_API_KEY": "stub-key",
            "KSI_CLAUDE_BIN": claude_bin,
            "KSI_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "KSI_WORKERS": str(WORKERS),
            "KSI_REDIS_URL": redis_url,
        }
    )
    server = None
    try:
        started = time.monotonic()
        subprocess.run([BIN / "ksi-supervisord"], env=bundle.env, check=True)
        with StateRecorder(bundle.home) as recorder:
            reports = []
            while time.monotonic() - started < REDIS_DELAY_S:
                report = _health(bundle)
                if report is not None:
                    reports.append(report)
                time.sleep(2)
            server = _start_redis(folder)
            client = redis.Redis.from_url(redis_url)
            while True:
                try:
                    client.ping()
                    break
                except (redis.ConnectionError, FileNotFoundError):
                    time.sleep(0.05)
            redis_up = time.monotonic()
            recovered_s = _wait_workers(bundle, redis_up + RECOVERY_LIMIT_S + 30)
            with bundle.client() as daemon:
                task_id = daemon.request("QUEUE_TASK", prompt="after the wait")[
                    "task_id"
                ]
            record = _wait_terminal(bundle, task_id)
        print(
            f"\nworkers RUNNING and live {recovered_s:.1f} s after Redis answered; "
            f"{len(reports)} health reports while it was down"
        )
        assert reports, "the daemon never answered while Redis was down"
        assert [r["status"] for r in reports] == ["unavailable"] * len(reports)
        assert all(r["redis"]["ok"] is False for r in reports)
        assert recorder.given_up == [], bundle.logs_tail()
        assert recorder.polls > (REDIS_DELAY_S + recovered_s) * 1.5
        assert recovered_s <= RECOVERY_LIMIT_S, bundle.logs_tail()
        assert record["status"] == "succeeded", record
        _assert_no_start_failures(bundle)
    finally:
        left = bundle.stop()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        bundle.cleanup()
    assert left == []


def _wait_workers(bundle: Bundle, deadline: float) -> float:
    """Wait until every ksi:* program runs and every worker has a heartbeat."""
    started = time.monotonic()
    while time.monotonic() < deadline:
        states = {n: i["statename"] for n, i in program_infos(bundle.home).items()}
        running = {name for name, state in states.items() if state == "RUNNING"}
        report = _health(bundle) or {}
        if (
            bundle.expected_programs() <= running
            and report.get("live_workers", 0) >= WORKERS
        ):
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"workers not running: {states}\n{bundle.logs_tail()}")


def _wait_terminal(bundle: Bundle, task_id: str) -> dict:
    deadline = time.monotonic() + 60
    with bundle.client() as client:
        while True:
            record = client.request("TASK_STATUS", task_id=task_id)
            if record["status"] in {"succeeded", "failed", "timed_out", "cancelled"}:
                return record
            assert time.monotonic() < deadline, record
            time.sleep(0.2)


def _assert_no_start_failures(bundle: Bundle) -> None:
    """Check that no ksi program exited while Redis was down."""
    log = (bundle.home / "log" / "supervisord.log").read_text()
    exits = [line for line in log.splitlines() if "exited:" in line]
    assert exits == [], "\n".join(exits)
