"""Task lifecycle under supervisord with the real CLI: retries, time limits,
cancel, dead letters, crashes, Redis restarts, drain on stop, and resume."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
import redis

from ksi_worker import keys
from ksi_worker.proctree import find_task_processes
from tests.bundle import Bundle
from tests.conftest import start_bundle

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(240)]

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}

#: Starts a process that leaves the CLI's process group and session.
ESCAPING_SLEEP = (
    "python3 -c 'import subprocess; "
    'subprocess.Popen(("sleep", "300"), start_new_session=True)\''
)


@pytest.fixture(scope="module")
def lifecycle_bundle(stub_api, claude_bin) -> Iterator[Bundle]:
    started = start_bundle(
        stub_api,
        claude_bin,
        KSI_BROKER_HEARTBEAT_TIMEOUT_S="8",
        KSI_BROKER_MAINTENANCE_S="1",
    )
    yield started
    started.finish()


def _wait_for(bundle: Bundle, task_id: str, states: set[str], timeout_s=90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        record = bundle.record(task_id)
        if record["status"] in states:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(
                f"task {task_id} is {record['status']}, expected {states}\n"
                + bundle.logs_tail()
            )
        time.sleep(0.1)


def _redis(bundle: Bundle) -> redis.Redis:
    return bundle.redis()


def _events(bundle: Bundle, task_id: str) -> list[tuple[str, int, dict]]:
    """Return a task's lifecycle events, leaving out TASK_PROGRESS."""
    return [
        (
            fields[b"event_type"].decode(),
            int(fields[b"attempt"]),
            json.loads(fields[b"payload"]),
        )
        for _, fields in _redis(bundle).xrange(keys.EVENT_STREAM)
        if fields[b"task_id"] == task_id.encode()
        and fields[b"event_type"] != b"TASK_PROGRESS"
    ]


def _gone(task_id: str, timeout_s: float = 10) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    left = find_task_processes(task_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = find_task_processes(task_id)
    return left


def test_rate_limit_then_success_retries_once(lifecycle_bundle):
    key = uuid.uuid4().hex
    task_id = lifecycle_bundle.submit(f"hi [stub:status=429,times=1,key={key}]")
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "succeeded"
    assert record["attempt"] == 2
    types = [event for event, _, _ in _events(lifecycle_bundle, task_id)]
    assert types == [
        "TASK_QUEUED",
        "TASK_STARTED",
        "TASK_RETRYING",
        "TASK_STARTED",
        "TASK_COMPLETED",
    ]
    retrying = [
        e for e in _events(lifecycle_bundle, task_id) if e[0] == "TASK_RETRYING"
    ]
    assert retrying[0][1] == 1
    assert retrying[0][2]["http_status"] == 429
    assert retrying[0][2]["delay_s"] > 0


def test_auth_failure_is_not_retried_and_dead_lettered(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("hi [stub:status=401]")
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "failed"
    assert record["attempt"] == 1
    assert record["error_class"] == "authentication"
    assert "HTTP 401" in record["error"]
    time.sleep(1)
    assert lifecycle_bundle.record(task_id)["attempt"] == 1
    done = lifecycle_bundle.ksi("dlq", "list", "--json")
    letters = json.loads(done.stdout)["dead_letters"]
    assert task_id in [letter["task_id"] for letter in letters]


def test_dead_letter_replay_keeps_id_and_history(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("hi [stub:status=400]")
    _wait_for(lifecycle_bundle, task_id, TERMINAL)
    replayed = lifecycle_bundle.ksi("dlq", "retry", "--json", task_id)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"task_id": task_id, "status": "queued"}
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "failed"
    assert record["attempt"] == 2
    assert record["replays"] == 1
    types = [event for event, _, _ in _events(lifecycle_bundle, task_id)]
    assert types.count("TASK_QUEUED") == 2
    assert types.count("TASK_FAILED") == 2


def test_dead_letter_purge(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("hi [stub:status=403]")
    _wait_for(lifecycle_bundle, task_id, TERMINAL)
    purged = json.loads(lifecycle_bundle.ksi("dlq", "purge", "--json").stdout)
    assert purged["purged"] >= 1
    letters = json.loads(lifecycle_bundle.ksi("dlq", "list", "--json").stdout)
    assert letters["dead_letters"] == []
    assert lifecycle_bundle.record(task_id)["status"] == "failed"


def test_slow_reply_past_time_limit_times_out(lifecycle_bundle):
    started = time.monotonic()
    task_id = lifecycle_bundle.submit("hi [stub:slow=60]", timeout_s=3)
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "timed_out"
    assert 3 <= record["elapsed_s"] < 3 + 2 + 5
    assert "time limit of 3 s" in record["error"]
    assert time.monotonic() - started < 30
    assert _gone(task_id) == []
    types = [event for event, _, _ in _events(lifecycle_bundle, task_id)]
    assert types.count("TASK_STARTED") == 1


def test_background_tool_process_is_killed_after_task(lifecycle_bundle):
    task_id = lifecycle_bundle.submit(
        f"go [stub:bash={ESCAPING_SLEEP}]", allowed_tools=["Bash"]
    )
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "succeeded"
    assert record["result"].startswith("stub answer: bash done")
    assert _gone(task_id) == []


def test_cancel_queued_and_running(lifecycle_bundle):
    blockers = [lifecycle_bundle.submit("block [stub:slow=60]") for _ in range(2)]
    for task_id in blockers:
        _wait_for(lifecycle_bundle, task_id, {"running"})
    queued = lifecycle_bundle.submit("never runs")

    reply = lifecycle_bundle.ksi("cancel", "--json", queued)
    assert json.loads(reply.stdout)["status"] == "cancelled"

    running = blockers[0]
    asked = time.monotonic()
    assert lifecycle_bundle.ksi("cancel", running).returncode == 0
    record = _wait_for(lifecycle_bundle, running, TERMINAL, timeout_s=10)
    assert record["status"] == "cancelled"
    assert _gone(running, timeout_s=2) == []
    assert time.monotonic() - asked < 2 + 1.5

    assert lifecycle_bundle.ksi("cancel", blockers[1]).returncode == 0
    _wait_for(lifecycle_bundle, blockers[1], TERMINAL, timeout_s=10)
    again = lifecycle_bundle.ksi("cancel", running)
    assert again.returncode == 6
    assert "already ended cancelled" in again.stderr
    time.sleep(1.5)
    assert lifecycle_bundle.record(queued)["status"] == "cancelled"
    types = [event for event, _, _ in _events(lifecycle_bundle, queued)]
    assert "TASK_STARTED" not in types


def test_worker_killed_mid_task_runs_again(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("crash [stub:slow=4]")
    running = _wait_for(lifecycle_bundle, task_id, {"running"})
    worker = psutil.Process(running["worker_pid"])
    killed_at = time.monotonic()
    worker.send_signal(signal.SIGKILL)

    lost = _wait_for(lifecycle_bundle, task_id, {"retrying"}, timeout_s=10)
    assert lost["error_class"] == "worker_lost"
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL, timeout_s=90)
    elapsed = time.monotonic() - killed_at
    assert record["status"] == "succeeded"
    assert record["attempt"] == 2
    assert record["worker_pid"] != running["worker_pid"]
    # Heartbeat timeout (8 s) + maintenance (1 s) + polling + the 4 s reply.
    assert elapsed < 8 + 1 + 5 + 4 + 10
    lifecycle_bundle.wait_running()
    print(f"worker SIGKILL to terminal state: {elapsed:.1f} s")


def test_redis_restart_loses_no_queued_task(lifecycle_bundle):
    task_ids = [lifecycle_bundle.submit(f"q{n} [stub:slow=0.3]") for n in range(20)]
    restart = lifecycle_bundle.ctl("restart", "ksi:redis")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    started = time.monotonic()
    for task_id in task_ids:
        record = _wait_for(lifecycle_bundle, task_id, TERMINAL, timeout_s=120)
        assert record["status"] == "succeeded", record
    print(f"20 tasks done {time.monotonic() - started:.1f} s after the Redis restart")
    lifecycle_bundle.wait_running()


def test_idempotent_resubmission(lifecycle_bundle):
    key = f"idem-{uuid.uuid4().hex}"
    first = lifecycle_bundle.client().request(
        "QUEUE_TASK", prompt="once", idempotency_key=key
    )
    second = lifecycle_bundle.client().request(
        "QUEUE_TASK", prompt="once", idempotency_key=key
    )
    assert second["task_id"] == first["task_id"]
    assert second["duplicate"] is True
    _wait_for(lifecycle_bundle, first["task_id"], TERMINAL)
    types = [event for event, _, _ in _events(lifecycle_bundle, first["task_id"])]
    assert types.count("TASK_QUEUED") == 1
    assert types.count("TASK_STARTED") == 1


def test_resume_continues_session(lifecycle_bundle):
    first = _wait_for(
        lifecycle_bundle, lifecycle_bundle.submit("remember 42"), TERMINAL
    )
    session_id = first["claude_session_id"]
    follow = lifecycle_bundle.submit("what number?", session_id=session_id)
    record = _wait_for(lifecycle_bundle, follow, TERMINAL)
    assert record["status"] == "succeeded", record.get("error")
    assert record["claude_session_id"] == session_id
    assert record["folder"] == first["folder"]


def test_resume_unknown_session_fails_at_once(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("hello", session_id=str(uuid.uuid4()))
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "failed"
    assert record["error_class"] == "session_not_found"
    assert record["attempt"] == 1
    assert "session" in record["error"].lower()


def test_worker_that_dies_every_attempt_is_dead_lettered(lifecycle_bundle):
    task_id = lifecycle_bundle.submit(
        "die [stub:bash=kill -9 $KSI_WORKER_PID]",
        allowed_tools=["Bash"],
        max_retries=1,
    )
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL, timeout_s=120)
    assert record["status"] == "failed"
    assert record["error_class"] == "attempts_exhausted"
    assert record["attempt"] == 2
    lifecycle_bundle.wait_running()


def test_stop_worker_drains_short_task(lifecycle_bundle):
    task_id = lifecycle_bundle.submit("short [stub:slow=3]")
    record = _wait_for(lifecycle_bundle, task_id, {"running"})
    name = _program_of(lifecycle_bundle, record["worker_pid"])
    stopped = lifecycle_bundle.ctl("stop", name)
    assert "stopped" in stopped.stdout
    final = lifecycle_bundle.record(task_id)
    assert final["status"] == "succeeded"
    assert final["attempt"] == 1
    lifecycle_bundle.ctl("start", name)
    lifecycle_bundle.wait_running()


def test_stop_worker_hands_back_long_task(lifecycle_bundle):
    # KSI_STOP_WAIT_S=20 and KSI_KILL_GRACE_S=2 leave a drain window of 8 s.
    task_id = lifecycle_bundle.submit("long [stub:slow=120]", timeout_s=300)
    record = _wait_for(lifecycle_bundle, task_id, {"running"})
    name = _program_of(lifecycle_bundle, record["worker_pid"])
    stopped = lifecycle_bundle.ctl("stop", name)
    assert "stopped" in stopped.stdout
    events = _events(lifecycle_bundle, task_id)
    handed_back = [payload for event, _, payload in events if event == "TASK_RETRYING"]
    assert handed_back[-1]["error_class"] == "worker_shutdown"
    assert not [
        process
        for process in find_task_processes(task_id)
        if _marker_worker(process) == record["worker_pid"]
    ]
    again = _wait_for(lifecycle_bundle, task_id, {"running"}, timeout_s=30)
    assert again["attempt"] == 1
    assert again["worker_pid"] != record["worker_pid"]
    lifecycle_bundle.ksi("cancel", task_id)
    _wait_for(lifecycle_bundle, task_id, TERMINAL, timeout_s=10)
    lifecycle_bundle.ctl("start", name)
    lifecycle_bundle.wait_running()


def _program_of(bundle: Bundle, worker_pid: int) -> str:
    parent = psutil.Process(worker_pid).ppid()
    for line in bundle.ctl("status").stdout.splitlines():
        parts = line.split()
        if "pid" in parts and parts[parts.index("pid") + 1].rstrip(",") == str(parent):
            return parts[0]
    raise AssertionError(f"no program has pid {parent}")


def _marker_worker(process: psutil.Process) -> int:
    try:
        return int(process.environ().get("KSI_WORKER_PID", 0))
    except psutil.Error:
        return 0


@pytest.fixture(scope="module")
def throttled_bundle(stub_api, claude_bin) -> Iterator[Bundle]:
    started = start_bundle(
        stub_api,
        claude_bin,
        KSI_AGENT_STARTS_PER_MINUTE="2",
        KSI_BUDGET_USD_PER_HOUR="0",
    )
    yield started
    started.finish()


def test_agent_rate_limit_holds_tasks_in_queue(throttled_bundle):
    task_ids = [
        throttled_bundle.submit(f"agent task {n}", agent_id="runaway") for n in range(4)
    ]
    done = [_wait_for(throttled_bundle, t, TERMINAL) for t in task_ids[:2]]
    assert [r["status"] for r in done] == ["succeeded", "succeeded"]
    time.sleep(2)
    waiting = [throttled_bundle.record(t) for t in task_ids[2:]]
    assert [r["status"] for r in waiting] == ["queued", "queued"]
    assert all("rate limit" in r["waiting_reason"] for r in waiting)
    with throttled_bundle.client() as client:
        health = client.request("HEALTH_CHECK")
    assert any("runaway" in problem for problem in health["problems"])
    other = _wait_for(
        throttled_bundle, throttled_bundle.submit("other agent"), TERMINAL
    )
    assert other["status"] == "succeeded"


def test_spend_budget_holds_tasks_in_queue(stub_api, claude_bin):
    bundle = start_bundle(stub_api, claude_bin, KSI_BUDGET_USD_PER_HOUR="0.01")
    try:
        first = _wait_for(bundle, bundle.submit("costly"), TERMINAL)
        assert first["status"] == "succeeded"
        assert first["cost_usd"] > 0.01
        second = bundle.submit("waits")
        time.sleep(3)
        record = bundle.record(second)
        assert record["status"] == "queued"
        assert record["waiting_reason"].startswith("budget")
        with bundle.client() as client:
            health = client.request("HEALTH_CHECK")
        assert any(p.startswith("budget") for p in health["problems"])
    finally:
        left = bundle.stop()
        bundle.cleanup()
    assert left == []


def test_env_of_worker_is_not_passed_to_claude(lifecycle_bundle):
    task_id = lifecycle_bundle.submit(
        "env [stub:bash=env | sort]", allowed_tools=["Bash"]
    )
    record = _wait_for(lifecycle_bundle, task_id, TERMINAL)
    assert record["status"] == "succeeded"
    assert "KSI_REDIS_URL" not in record["result"]
    assert (
        os.environ.get("HOME", "/root") not in record["result"].split("HOME=")[-1][:20]
    )
