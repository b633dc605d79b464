"""The reaper: which marked processes count as orphaned, how they are killed,
and the reaper program under supervisord with the real CLI."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from prometheus_client import REGISTRY

from ksi_worker import keys
from ksi_worker.proctree import (
    MARKER_ATTEMPT,
    MARKER_BUNDLE_HOME,
    MARKER_TASK_ID,
    MARKER_WORKER_CREATED,
    MARKER_WORKER_PID,
    _skip_reason,
    find_task_processes,
    read_marker,
)
from ksi_worker.reaper import Reaper, Reason, scan_report
from ksi_worker.reaper_metrics import PrometheusReaperMetrics
from ksi_worker.store import TaskStore
from tests.bundle import BIN, Bundle
from tests.conftest import start_bundle

pytestmark = pytest.mark.timeout(120)

#: Starts argv in a session of its own and prints its pid, then exits, so the
#: process is reparented like a tool that outlived the CLI.
SPAWN_DETACHED = (
    "import subprocess, sys; print(subprocess.Popen(sys.argv[1:], "
    "start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL).pid)"
)

#: Starts about 100 short processes a second, every other one with this
#: script's environment, until the file named by its argument exists. Then it
#: prints the rate reached.
CHURN = """
import os, subprocess, sys, time
plain = {"PATH": os.environ["PATH"]}
count, began = 0, time.monotonic()
print("started", flush=True)
while not os.path.exists(sys.argv[1]):
    subprocess.Popen(["true"], env=None if count % 2 else plain).wait()
    count += 1
    time.sleep(max(0.0, began + count / 100 - time.monotonic()))
print(count / (time.monotonic() - began))
"""

#: Reaper scan interval of the bundle under test, in seconds.
BUNDLE_INTERVAL_S = 2.0

#: Extra seconds allowed for scheduling on a loaded 2-core machine.
SLACK_S = 4.0


def _marker_env(
    home: str,
    task_id: str,
    *,
    attempt: int = 1,
    worker_pid: int | None = None,
    worker_created: float | None = None,
) -> dict[str, str]:
    """Return the environment of a task's process; the worker defaults to us."""
    if worker_pid is None:
        worker_pid = os.getpid()
    if worker_created is None:
        worker_created = psutil.Process(worker_pid).create_time()
    return {
        "PATH": os.environ["PATH"],
        MARKER_TASK_ID: task_id,
        MARKER_ATTEMPT: str(attempt),
        MARKER_WORKER_PID: str(worker_pid),
        MARKER_WORKER_CREATED: repr(worker_created),
        MARKER_BUNDLE_HOME: home,
    }


@pytest.fixture
def spawn() -> Iterator[Callable[..., psutil.Process]]:
    """Start detached processes for a test and kill the survivors afterwards."""
    started: list[psutil.Process] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> psutil.Process:
        env = env if env is not None else {"PATH": os.environ["PATH"]}
        done = subprocess.run(
            [sys.executable, "-c", SPAWN_DETACHED, *argv],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        )
        process = psutil.Process(int(done.stdout))
        started.append(process)
        return process

    yield start
    for process in started:
        for leftover in [*_children(process), process]:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _kill_count(reason: str) -> float:
    value = REGISTRY.get_sample_value("ksi_reaper_kills_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
def store(redis_server) -> TaskStore:
    return TaskStore(redis.Redis.from_url(redis_server))


@pytest.fixture
def home(tmp_path) -> str:
    return str(tmp_path)


@pytest.fixture
def reaper(store, home) -> Reaper:
    return Reaper(
        store.client,
        bundle_home=home,
        kill_grace_s=1,
        deadline_grace_s=1,
        default_timeout_s=600,
        metrics=PrometheusReaperMetrics(),
    )


def _task(
    store: TaskStore,
    status: str,
    *,
    attempt: int = 1,
    worker_pid: int | None = None,
    timeout_s: float = 600,
) -> str:
    """Write a task record in ``status``; its worker defaults to this process."""
    task_id = uuid.uuid4().hex
    store.create(task_id, {"prompt": "p", "timeout_s": timeout_s})
    store.set_fields(
        task_id,
        {
            "status": status,
            "attempt": attempt,
            "worker_pid": worker_pid or os.getpid(),
            "started_at": time.time(),
        },
    )
    return task_id


def _exited_process() -> tuple[int, float]:
    """Return the pid and create time of a process that has exited."""
    child = subprocess.Popen(["true"])
    created = psutil.Process(child.pid).create_time()
    child.wait()
    return child.pid, created


def test_running_task_and_decoy_survive_scans(reaper, store, home, spawn):
    task_id = _task(store, "running")
    tool = spawn(["sleep", "60"], _marker_env(home, task_id))
    decoy = spawn(["sleep", "60"])
    # Orphaned by every rule, but of another bundle.
    dead_pid, dead_created = _exited_process()
    elsewhere = spawn(
        ["sleep", "60"],
        _marker_env(
            "/tmp/other-bundle",
            uuid.uuid4().hex,
            worker_pid=dead_pid,
            worker_created=dead_created,
        ),
    )

    for _ in range(5):
        scan, kills = reaper.run_once()
        assert scan.orphans == []
        assert kills == []
    assert scan.marked_processes == 1
    assert _running(tool)
    assert _running(decoy)
    assert _running(elsewhere)


@pytest.mark.parametrize(
    "status", ["queued", "retrying", "succeeded", "failed", "cancelled", None]
)
def test_task_not_running_is_orphaned(reaper, store, home, spawn, status):
    task_id = _task(store, status) if status else uuid.uuid4().hex
    leftover = spawn(["sleep", "60"], _marker_env(home, task_id))
    before = _kill_count("task_not_running")

    scan, kills = reaper.run_once()

    assert [orphan.reason for orphan in scan.orphans] == [Reason.TASK_NOT_RUNNING]
    assert [kill.pid for kill in kills] == [leftover.pid]
    assert not _running(leftover)
    assert _kill_count("task_not_running") == before + 1


def test_replaced_attempt_is_orphaned(reaper, store, home, spawn):
    # The record runs attempt 2; attempt 1 on the same live worker has ended.
    older = _task(store, "running", attempt=2)
    old_attempt = spawn(["sleep", "60"], _marker_env(home, older, attempt=1))
    # A handed-back attempt's number is reused by the next attempt on another
    # worker, so the worker pid distinguishes the two.
    reused = _task(store, "running", attempt=1, worker_pid=1)
    other_worker = spawn(["sleep", "60"], _marker_env(home, reused, attempt=1))
    current = spawn(["sleep", "60"], _marker_env(home, older, attempt=2))

    _, kills = reaper.run_once()

    assert sorted(kill.pid for kill in kills) == sorted(
        [old_attempt.pid, other_worker.pid]
    )
    assert {kill.reason for kill in kills} == {Reason.TASK_NOT_RUNNING}
    assert _running(current)


def test_dead_worker_with_reused_pid_is_orphaned(reaper, store, home, spawn):
    # The marker names a worker pid that now belongs to an unrelated process
    # with another create time, and the record still shows running.
    stranger = spawn(["sleep", "60"])
    task_id = _task(store, "running", worker_pid=stranger.pid)
    marker = _marker_env(
        home,
        task_id,
        worker_pid=stranger.pid,
        worker_created=stranger.create_time() - 1000,
    )
    tool = spawn(["sleep", "60"], marker)
    before = _kill_count("worker_gone")

    scan, kills = reaper.run_once()

    assert [orphan.reason for orphan in scan.orphans] == [Reason.WORKER_GONE]
    assert [kill.pid for kill in kills] == [tool.pid]
    assert _kill_count("worker_gone") == before + 1
    assert not _running(tool)
    assert _running(stranger)


def test_dead_worker_with_fresh_heartbeat_is_orphaned(reaper, store, home, spawn):
    # A worker's heartbeat outlives it by up to HEARTBEAT_TIMEOUT_S; a pid
    # that no process has is gone all the same.
    dead_pid, dead_created = _exited_process()
    worker_id = f"{socket.gethostname()}:{dead_pid}"
    store.client.zadd(keys.WORKERS, {worker_id: time.time()})
    store.client.hset(
        keys.worker(worker_id),
        mapping={"pid": str(dead_pid), "create_time": repr(dead_created)},
    )
    task_id = _task(store, "running", worker_pid=dead_pid)
    marker = _marker_env(
        home, task_id, worker_pid=dead_pid, worker_created=dead_created
    )
    tool = spawn(["sleep", "60"], marker)

    scan, kills = reaper.run_once()

    assert [orphan.reason for orphan in scan.orphans] == [Reason.WORKER_GONE]
    assert [kill.pid for kill in kills] == [tool.pid]


def test_heartbeat_vouches_for_worker_after_clock_step(reaper, store, home, spawn):
    # A wall clock step changes every create time that psutil computes, but
    # not the one the worker recorded in its heartbeat.
    stepped = psutil.Process().create_time() - 30
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    store.client.zadd(keys.WORKERS, {worker_id: time.time()})
    store.client.hset(
        keys.worker(worker_id),
        mapping={"pid": str(os.getpid()), "create_time": repr(stepped)},
    )
    task_id = _task(store, "running")
    tool = spawn(["sleep", "60"], _marker_env(home, task_id, worker_created=stepped))

    scan, kills = reaper.run_once()

    assert scan.orphans == []
    assert kills == []
    assert _running(tool)


def test_deadline_exceeded_is_orphaned(reaper, store, home, spawn):
    task_id = _task(store, "running", timeout_s=1)
    tool = spawn(["sleep", "60"], _marker_env(home, task_id))

    first, _ = reaper.run_once()
    assert first.orphans == []
    # The reaper's grace is 1 s, so the limit is 2 s of process age.
    time.sleep(2.2)
    scan, kills = reaper.run_once()

    assert [orphan.reason for orphan in scan.orphans] == [Reason.DEADLINE_EXCEEDED]
    assert [kill.pid for kill in kills] == [tool.pid]


def test_redis_down_applies_dead_worker_rule_only(
    reaper, store, home, spawn, tmp_path, caplog
):
    dead_pid, dead_created = _exited_process()
    unknown_task = uuid.uuid4().hex
    of_dead_worker = spawn(
        ["sleep", "60"],
        _marker_env(
            home, unknown_task, worker_pid=dead_pid, worker_created=dead_created
        ),
    )
    of_live_worker = spawn(["sleep", "60"], _marker_env(home, uuid.uuid4().hex))
    reaper.client = redis.Redis.from_url(f"unix://{tmp_path}/missing.sock")
    caplog.set_level(logging.INFO, logger="ksi_worker.reaper")

    _, kills = reaper.run_once()
    again, _ = reaper.run_once()

    assert [kill.pid for kill in kills] == [of_dead_worker.pid]
    assert again.redis_reachable is False
    assert _running(of_live_worker)
    outage = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(outage) == 1

    reaper.client = store.client
    _, kills = reaper.run_once()
    assert [kill.pid for kill in kills] == [of_live_worker.pid]
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_invalid_record_leaves_processes_alone(reaper, store, home, spawn, caplog):
    task_id = _task(store, "running")
    store.client.hset(keys.task(task_id), "attempt", "not a number")
    tool = spawn(["sleep", "60"], _marker_env(home, task_id))
    caplog.set_level(logging.WARNING, logger="ksi_worker.reaper")

    for _ in range(2):
        _, kills = reaper.run_once()
        assert kills == []

    assert _running(tool)
    invalid = [r for r in caplog.records if "invalid record" in r.getMessage()]
    assert len(invalid) == 1


def test_group_of_marked_leader_is_killed(reaper, store, home, spawn):
    task_id = _task(store, "succeeded")
    # bash leads the group; its child cleared its environment but stays in
    # the group, as a tool started with `env -i` would.
    leader = spawn(["bash", "-c", "env -i sleep 60; true"], _marker_env(home, task_id))
    _wait_until(lambda: _children(leader), 5, "bash did not start its child")
    unmarked_member = _children(leader)[0]

    _, kills = reaper.run_once()

    assert [kill.pid for kill in kills] == [leader.pid]
    _wait_until(lambda: not _running(unmarked_member), 5, "the member outlived")


def test_group_of_unmarked_leader_is_spared(reaper, store, home, spawn):
    task_id = _task(store, "succeeded")
    marker = " ".join(
        shlex.quote(f"{name}={value}")
        for name, value in _marker_env(home, task_id).items()
    )
    # An unmarked bash leads the group and runs a marked child, then more.
    leader = spawn(["bash", "-c", f"env {marker} sleep 60; sleep 60"])
    _wait_until(lambda: find_task_processes(task_id), 5, "no marked child started")
    marked = find_task_processes(task_id)

    _, kills = reaper.run_once()

    assert [kill.pid for kill in kills] == [process.pid for process in marked]
    assert _running(leader)


def test_recheck_refuses_changed_process(home, spawn):
    # After 2 s the marked bash execs into an unmarked sleep: same pid, same
    # create time, no marker.
    task_id = uuid.uuid4().hex
    process = spawn(
        ["bash", "-c", "sleep 2; exec env -i sleep 60"], _marker_env(home, task_id)
    )
    marker = read_marker(process)
    assert marker is not None
    accept = marker.__eq__

    assert _skip_reason(process, accept) is None
    # The same process, but the caller now accepts another task's marker only.
    other_task = _skip_reason(process, lambda found: found.task_id == "another")
    assert other_task == "it no longer carries a matching marker"
    _wait_until(lambda: read_marker(process) is None, 5, "bash did not exec")
    assert _skip_reason(process, accept) == "it no longer carries a matching marker"
    process.kill()
    _wait_until(lambda: not _running(process), 5, "sleep outlived SIGKILL")
    assert _skip_reason(process, accept) == "exited"


def test_scans_survive_churn_and_strangers(reaper, store, home, spawn, tmp_path):
    running_env = _marker_env(home, _task(store, "running"))
    orphan = spawn(["sleep", "60"], _marker_env(home, _task(store, "succeeded")))
    # A zombie child of ours carrying a marker, and a marked process of
    # another user.
    zombie = subprocess.Popen(["true"], env=_marker_env(home, uuid.uuid4().hex))
    stranger = subprocess.Popen(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "sleep",
            "60",
        ],
        env=running_env,
    )
    _wait_until(
        lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE,
        5,
        "the child did not turn zombie",
    )
    _wait_until(
        lambda: psutil.Process(stranger.pid).username() == "nobody",
        5,
        "setpriv did not switch to nobody",
    )
    stop_file = tmp_path / "stop-churn"
    churn = subprocess.Popen(
        [sys.executable, "-c", CHURN, str(stop_file)],
        env=running_env,
        stdout=subprocess.PIPE,
        text=True,
    )

    assert churn.stdout.readline().strip() == "started"

    killed = []
    try:
        for _ in range(50):
            _, kills = reaper.run_once()
            killed += [kill.pid for kill in kills]
            # Spread the scans over a few seconds of churn.
            time.sleep(0.05)
    finally:
        stop_file.touch()
        rate = float(churn.communicate(timeout=30)[0].split()[-1])

    assert killed == [orphan.pid]
    assert rate > 50, f"only {rate:.0f} processes a second came and went"
    assert stranger.poll() is None
    stranger.kill()
    stranger.wait()
    zombie.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")
def test_scan_as_other_user_completes(home, spawn):
    dead_pid, dead_created = _exited_process()
    dead_worker = {"worker_pid": dead_pid, "worker_created": dead_created}
    spawn(["sleep", "60"], _marker_env(home, uuid.uuid4().hex, **dead_worker))
    # A forked child switches to nobody: it can read the environment of its
    # own processes only, and the project's interpreter may be unreadable to
    # nobody, so no new Python starts.
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            own = subprocess.Popen(
                ["sleep", "60"], env=_marker_env(home, "own", **dead_worker)
            )
            reaper = Reaper(
                redis.Redis.from_url("unix:///nonexistent/redis.sock"),
                bundle_home=home,
                kill_grace_s=1,
                deadline_grace_s=1,
                default_timeout_s=600,
            )
            scan = reaper.scan()
            kills = reaper.kill(scan.orphans)
            own.wait(timeout=10)
            os.write(write_end, json.dumps(scan_report(scan, kills)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        report = json.loads(output.read() or "{}")
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert [orphan["task_id"] for orphan in report["orphans"]] == ["own"]
    assert [kill["task_id"] for kill in report["killed"]] == ["own"]


def test_reap_command_dry_run_then_real(redis_server, store, home, spawn):
    task_id = _task(store, "succeeded")
    leftover = spawn(["sleep", "60"], _marker_env(home, task_id))
    env = {**os.environ, "KSI_HOME": home, "KSI_REDIS_URL": redis_server}

    dry = subprocess.run(
        [BIN / "ksi", "reap", "--dry-run", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    assert [(o["pid"], o["task_id"], o["reason"]) for o in report["orphans"]] == [
        (leftover.pid, task_id, "task_not_running")
    ]
    assert _running(leftover)

    real = subprocess.run(
        [BIN / "ksi", "reap"], env=env, capture_output=True, text=True, timeout=60
    )
    assert real.returncode == 0, real.stderr
    assert f"pid {leftover.pid}  sleep  task {task_id}" in real.stdout
    assert "killed 1 processes" in real.stdout
    assert not _running(leftover)


# --- The reaper program under supervisord, with the real CLI ---------------


@pytest.fixture(scope="module")
def reaper_bundle(stub_api, claude_bin) -> Iterator[Bundle]:
    started = start_bundle(
        stub_api, claude_bin, KSI_REAPER_INTERVAL_S=str(BUNDLE_INTERVAL_S)
    )
    yield started
    started.finish()


def _tool_sleep(task_id: str) -> list[psutil.Process]:
    found = []
    for process in find_task_processes(task_id):
        try:
            if process.name() == "sleep":
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _reaper_log(bundle: Bundle) -> str:
    return (bundle.home / "log" / "reaper.log").read_text(errors="replace")


@pytest.mark.bundle
def test_killed_worker_tree_is_reaped(reaper_bundle, spawn):
    bundle = reaper_bundle
    doomed = bundle.submit(
        "doomed [stub:bash=sleep 120]", allowed_tools=["Bash"], max_retries=0
    )
    survivor = bundle.submit("lives [stub:bash=sleep 60]", allowed_tools=["Bash"])
    decoy = spawn(["sleep", "300"])
    for task_id in (doomed, survivor):
        _wait_until(lambda t=task_id: _tool_sleep(t), 60, f"no sleep for {task_id}")
    doomed_worker = read_marker(_tool_sleep(doomed)[0]).worker_pid
    survivor_tool = _tool_sleep(survivor)[0]
    survivor_worker = psutil.Process(read_marker(survivor_tool).worker_pid)
    # The CLI is the worker's child; other processes of the tree may come and go.
    survivor_cli = [
        process
        for process in find_task_processes(survivor)
        if process.ppid() == survivor_worker.pid
    ]
    assert len(survivor_cli) == 1
    assert doomed_worker != survivor_worker.pid

    os.kill(doomed_worker, signal.SIGKILL)
    took = _wait_until(
        lambda: find_task_processes(doomed) == [],
        2 * BUNDLE_INTERVAL_S + 2 + SLACK_S,
        "processes of the task of the killed worker outlived it" + bundle.logs_tail(),
    )
    # Two more scans with the surviving task's tree in place.
    time.sleep(max(0.0, 2 * BUNDLE_INTERVAL_S - took) + 2 * BUNDLE_INTERVAL_S)

    _wait_until(
        lambda: f"of task {doomed} attempt 1: worker_gone" in _reaper_log(bundle),
        5,
        "the reaper logged no worker_gone kill:\n" + _reaper_log(bundle),
    )
    assert survivor not in _reaper_log(bundle)
    assert _running(survivor_tool)
    assert _running(survivor_cli[0])
    assert _running(survivor_worker)
    assert _running(decoy)
    with bundle.client() as client:
        client.request("CANCEL_TASK", task_id=survivor)
    _wait_until(
        lambda: bundle.record(survivor)["status"] == "cancelled", 30, "no cancel"
    )


@pytest.mark.bundle
def test_leftovers_of_finished_task_are_reaped(reaper_bundle):
    bundle = reaper_bundle
    task_id = bundle.submit("quick")
    _wait_until(
        lambda: bundle.record(task_id)["status"] == "succeeded", 60, "no success"
    )
    worker_pid = bundle.record(task_id)["worker_pid"]
    env = _marker_env(str(Path(bundle.home).resolve()), task_id, worker_pid=worker_pid)
    # The middle bash exits at once; its two sleeps stay, with the marker.
    started = subprocess.run(
        [
            "bash",
            "-c",
            "sleep 600 >/dev/null 2>&1 & echo $!; sleep 600 >/dev/null 2>&1 & echo $!",
        ],
        env=env,
        start_new_session=True,
        capture_output=True,
        text=True,
        check=True,
    )
    pids = [int(line) for line in started.stdout.split()]
    assert len(pids) == 2

    _wait_until(
        lambda: find_task_processes(task_id) == [],
        2 * BUNDLE_INTERVAL_S + 2 + SLACK_S,
        "the leftovers outlived two reaper scans" + bundle.logs_tail(),
    )
    for pid in pids:
        line = f"Killed pid {pid} (sleep) of task {task_id} attempt 1: task_not_running"
        _wait_until(lambda n=line: n in _reaper_log(bundle), 5, f"no log: {line}")
    assert bundle.record(task_id)["status"] == "succeeded"
