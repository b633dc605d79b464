"""A worker killed mid-task: supervisord restarts it alone, the others go on."""

from __future__ import annotations

import signal
import time

import pytest

from tests.bundle import Bundle
from tests.conftest import start_bundle
from tests.faults import StateRecorder, dramatiq_child, program_infos, program_pids

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(240)]

WORKERS = 4
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}
KILLED = "ksi:worker_00"


def _records(bundle: Bundle, task_ids: list[str]) -> dict[str, dict]:
    with bundle.client() as client:
        return {
            task_id: client.request("TASK_STATUS", task_id=task_id)
            for task_id in task_ids
        }


def _wait_records(
    bundle: Bundle, task_ids: list[str], states: set[str], timeout_s: float
) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = _records(bundle, task_ids)
        if all(record["status"] in states for record in records.values()):
            return records
        if time.monotonic() > deadline:
            found = {task_id: r["status"] for task_id, r in records.items()}
            raise AssertionError(
                f"tasks not {states} after {timeout_s} s: {found}\n"
                + bundle.logs_tail()
            )
        time.sleep(0.2)


def test_killed_worker_restarts_alone(stub_api, claude_bin):
    bundle = start_bundle(
        stub_api,
        claude_bin,
        KSI_WORKERS=str(WORKERS),
        KSI_BROKER_HEARTBEAT_TIMEOUT_S="8",
        KSI_BROKER_MAINTENANCE_S="1",
    )
    try:
        with StateRecorder(bundle.home) as recorder:
            _check_isolation(bundle)
        workers = {f"ksi:worker_{n:02d}" for n in range(WORKERS)}
        for name, states in recorder.seen.items():
            if name != KILLED and name in workers:
                assert set(states) == {"RUNNING"}, f"{name} was {dict(states)}"
        assert "FATAL" not in recorder.states_of(KILLED)
        assert recorder.given_up == []
        final = {n: i["statename"] for n, i in program_infos(bundle.home).items()}
        assert [n for n, s in final.items() if s in ("EXITED", "FATAL")] == []
    finally:
        left = bundle.stop()
        bundle.cleanup()
    assert left == []


def _check_isolation(bundle: Bundle) -> None:
    with bundle.client() as client:
        task_ids = [
            client.request("QUEUE_TASK", prompt=f"iso {n} [stub:slow=15]")["task_id"]
            for n in range(WORKERS)
        ]
    running = _wait_records(bundle, task_ids, {"running"}, timeout_s=30)
    assert len({record["worker_pid"] for record in running.values()}) == WORKERS

    before = program_pids(bundle.home, "ksi:worker_")
    child = dramatiq_child(before[KILLED])
    assert child is not None
    victim = next(t for t, r in running.items() if r["worker_pid"] == child.pid)
    killed_at = time.monotonic()
    child.send_signal(signal.SIGKILL)

    restarted_pid = None
    while time.monotonic() - killed_at < 20:
        info = program_infos(bundle.home)[KILLED]
        if info["statename"] == "RUNNING" and info["pid"] != before[KILLED]:
            restarted_pid = info["pid"]
            break
        time.sleep(0.2)
    restart_s = time.monotonic() - killed_at
    assert restarted_pid is not None, bundle.logs_tail()

    final = _wait_records(bundle, task_ids, TERMINAL, timeout_s=90)
    after = program_pids(bundle.home, "ksi:worker_")
    print(
        f"\n{KILLED} RUNNING again {restart_s:.1f} s after SIGKILL of its child; "
        f"its task ended {time.monotonic() - killed_at:.1f} s after it"
    )
    for name, pid in before.items():
        if name != KILLED:
            assert after[name] == pid, f"{name} restarted"
    assert after[KILLED] == restarted_pid
    for task_id, record in final.items():
        assert record["status"] == "succeeded", record
        if task_id == victim:
            assert record["attempt"] == 2
        else:
            assert record["attempt"] == 1
            assert record["worker_pid"] == running[task_id]["worker_pid"]

    # Dramatiq's parent exits with 1 (its RET_KILLED) when a child is killed,
    # and autorestart=true restarts the program whatever its exit status.
    supervisord_log = (bundle.home / "log" / "supervisord.log").read_text()
    assert "exited: worker_00 (exit status 1; not expected)" in supervisord_log
