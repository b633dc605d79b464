"""The whole ksi:* bundle under supervisord, running the real Claude CLI."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import redis

from ksi_worker import keys
from ksi_worker.proctree import find_task_processes
from tests.bundle import BIN

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(300)]


def test_all_programs_running(bundle):
    states = bundle.program_states()
    assert {name: states.get(name) for name in bundle.expected_programs()} == {
        name: "RUNNING" for name in bundle.expected_programs()
    }


def test_five_tasks_end_to_end(bundle):
    task_ids = []
    for n in range(5):
        submitted = bundle.ksi("submit", "--json", f"question number {n}\nmore text")
        assert submitted.returncode == 0, submitted.stderr
        reply = json.loads(submitted.stdout)
        assert reply["status"] == "queued"
        task_ids.append(reply["task_id"])

    for n, task_id in enumerate(task_ids):
        waited = bundle.ksi("wait", "--timeout", "120", task_id)
        assert waited.returncode == 0, waited.stderr + bundle.logs_tail()
        assert waited.stdout.strip() == f"stub answer: question number {n}"

        record = json.loads(bundle.ksi("status", "--json", task_id).stdout)
        assert record["status"] == "succeeded"
        assert record["attempt"] == 1
        assert record["result"] == f"stub answer: question number {n}"
        assert record["claude_session_id"]
        assert record["cost_usd"] > 0
        assert record["error"] is None
        assert record["finished_at"] >= record["started_at"] >= record["created_at"]


def test_submit_wait_prints_answer(bundle):
    done = bundle.ksi("submit", "--wait", "say hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stub answer: say hello"


def test_events_of_a_task_in_order(bundle):
    task_id = json.loads(bundle.ksi("submit", "--json", "events please").stdout)[
        "task_id"
    ]
    assert bundle.ksi("wait", task_id).returncode == 0

    client = bundle.redis()
    types = [
        fields[b"event_type"].decode()
        for _, fields in client.xrange(keys.EVENT_STREAM)
        if fields[b"task_id"] == task_id.encode()
    ]
    assert types[:2] == ["TASK_QUEUED", "TASK_STARTED"]
    assert types[-1] == "TASK_COMPLETED"
    assert set(types[2:-1]) == {"TASK_PROGRESS"}


def test_non_retryable_failure_is_reported(bundle):
    done = bundle.ksi("submit", "--wait", "--json", "nope [stub:status=401]")
    assert done.returncode == 1
    record = json.loads(done.stdout)
    assert record["status"] == "failed"
    assert record["error_class"] == "authentication"
    assert record["http_status"] == 401
    assert record["attempt"] == 1


def test_health_sees_workers(bundle):
    report = json.loads(bundle.ksi("health", "--json").stdout)
    assert report["status"] == "ok"
    assert report["live_workers"] == 2


def test_unreachable_daemon_message(bundle, tmp_path):
    env = {**bundle.env, "KSI_HOME": str(tmp_path)}
    done = subprocess.run(
        [BIN / "ksi", "health"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 3
    assert "ksi-supervisord" in done.stderr


def test_redis_requires_the_generated_password(bundle):
    password_file = bundle.home / "secrets" / "redis.password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    anonymous = redis.Redis(unix_socket_path=str(bundle.home / "run" / "redis.sock"))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    assert bundle.redis().ping() is True


def test_password_never_on_a_command_line(bundle):
    password = (bundle.home / "secrets" / "redis.password").read_text().strip()
    for process in bundle.processes():
        assert password not in " ".join(process.cmdline()), process.pid


def test_sockets_and_task_folders_are_private(bundle):
    run = bundle.home / "run"
    assert (run / "supervisor.sock").stat().st_mode & 0o777 == 0o700
    assert (run / "ksi.sock").stat().st_mode & 0o777 == 0o600
    assert (run / "redis.sock").stat().st_mode & 0o777 == 0o700
    folders = list((bundle.home / "tasks").iterdir())
    assert folders
    for folder in folders:
        assert folder.stat().st_mode & 0o777 == 0o700


def test_prompt_never_on_a_command_line(bundle):
    secret = "prompt-text-that-must-stay-private"
    with bundle.client() as client:
        task_id = client.request("QUEUE_TASK", prompt=f"{secret} [stub:slow=3]")[
            "task_id"
        ]
    deadline = time.monotonic() + 30
    seen = []
    while not seen and time.monotonic() < deadline:
        seen = find_task_processes(task_id)
        time.sleep(0.1)
    assert seen, "the task's claude process never appeared"
    for process in seen:
        assert secret not in " ".join(process.cmdline())
    assert bundle.ksi("wait", task_id).returncode == 0
