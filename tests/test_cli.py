"""Every ``ksi`` subcommand, in a real terminal under tmux and with ``--json``.

One bundle runs for the module, with the real CLI against the stand-in API.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.bundle import BIN, Bundle
from tests.conftest import start_bundle

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(300)]


class Terminal:
    """A tmux session of 200x50 on a private tmux server, running bash."""

    def __init__(self, env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing; run scripts/setup")
        self.folder = Path(tempfile.mkdtemp(prefix="ksi-tmux-", dir="/tmp"))
        self.socket = self.folder / "tmux.sock"
        self.env = {**env, "TERM": "xterm-256color", "PS1": "$ "}
        self.commands = 0
        self._tmux(
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "-s",
            "ksi",
            "bash --norc --noprofile",
        )

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "ksi")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "ksi", *keys)

    def start(self, command: str) -> None:
        """Type ``command`` on a cleared screen, followed by an exit code mark."""
        self.commands += 1
        self.keys("clear", "Enter")
        self.keys(f"{command}; echo __exit_{self.commands}_$?__", "Enter")

    def run(self, command: str, timeout_s: float = 120) -> tuple[int, str]:
        """Run ``command``; return its exit code and the screen."""
        self.start(command)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = 120) -> tuple[int, str]:
        """Wait for the last started command; return its exit code and screen."""
        mark = re.compile(rf"__exit_{self.commands}_(\d+)__")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            found = mark.search(screen)
            if found:
                return int(found.group(1)), screen
            time.sleep(0.2)
        raise AssertionError(f"no exit within {timeout_s} s; screen:\n{self.screen()}")

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not shown; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"],
            env=self.env,
            capture_output=True,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_bundle(stub_api, claude_bin):
    started = start_bundle(stub_api, claude_bin)
    yield started
    started.finish()


@pytest.fixture
def terminal(cli_bundle):
    opened = Terminal(cli_bundle.env)
    yield opened
    opened.close()


KSI = str(BIN / "ksi")


def _submit(bundle: Bundle, *args: str) -> str:
    done = bundle.ksi("submit", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["task_id"]


# In a terminal.


def test_terminal_submit_wait_live_view(terminal):
    code, screen = terminal.run(f"{KSI} submit --wait 'terminal question'")
    assert code == 0, screen
    assert "stub answer: terminal question" in screen
    assert "succeeded" in screen
    assert "tokens" in screen
    assert "\x1b" not in screen


def test_terminal_status_list_queues_health(terminal, cli_bundle):
    task_id = _submit(cli_bundle, "listed task")
    assert cli_bundle.ksi("wait", task_id).returncode == 0

    code, screen = terminal.run(f"{KSI} status {task_id}")
    assert code == 0, screen
    assert f"task_id: {task_id}" in screen
    assert "status: succeeded" in screen

    code, screen = terminal.run(f"{KSI} list --limit 5")
    assert code == 0, screen
    assert re.search(r"task\s+status\s+attempt", screen), screen
    assert task_id in screen

    code, screen = terminal.run(f"{KSI} queues")
    assert code == 0, screen
    assert re.search(r"queue\s+ready\s+delayed\s+dead", screen), screen
    assert re.search(r"claude\s+\d+\s+\d+\s+\d+", screen), screen

    code, screen = terminal.run(f"{KSI} health")
    assert code == 0, screen
    assert "status: ok" in screen
    assert "live workers: 2" in screen


def test_terminal_wait_and_cancel(terminal, cli_bundle):
    task_id = _submit(cli_bundle, "slow one [stub:slow=60]")
    terminal.start(f"{KSI} wait {task_id}")
    terminal.wait_for("running")

    cancelled = cli_bundle.ksi("cancel", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() in (
        f"task {task_id}: cancelling",
        f"task {task_id}: cancelled",
    )
    code, screen = terminal.wait_exit(60)
    assert code == 5, screen
    assert f"task {task_id} ended cancelled: cancelled by request" in screen


def test_terminal_wait_interrupted_exits_130(terminal, cli_bundle):
    task_id = _submit(cli_bundle, "interrupted wait [stub:slow=60]")
    terminal.start(f"{KSI} wait {task_id}")
    terminal.wait_for("elapsed")  # the live view is drawn
    terminal.keys("C-c")
    code, screen = terminal.wait_exit(15)
    cli_bundle.ksi("cancel", task_id)
    assert code == 130, screen
    assert f"task {task_id} goes on" in screen
    assert "Traceback" not in screen


def test_terminal_watch_until_interrupted(terminal, cli_bundle):
    terminal.start(f"{KSI} watch --type TASK_COMPLETED")
    time.sleep(1.5)  # let watch subscribe before the task ends
    task_id = _submit(cli_bundle, "watched task")
    screen = terminal.wait_for(task_id)
    assert "TASK_COMPLETED" in screen
    terminal.keys("C-c")
    code, screen = terminal.wait_exit(15)
    assert code == 0, screen


def test_terminal_unreachable_daemon_hint(terminal):
    code, screen = terminal.run(f"KSI_HOME=/tmp/ksi-nowhere {KSI} health")
    assert code == 3, screen
    assert "ksi-supervisord" in screen
    assert "ksi-supervisorctl status" in screen


# With --json and other scripted use.


def test_json_submit_wait_status_list(cli_bundle):
    done = cli_bundle.ksi("submit", "--wait", "--json", "scripted question")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded"
    assert record["result"] == "stub answer: scripted question"

    status = cli_bundle.ksi("status", "--json", record["task_id"])
    assert json.loads(status.stdout)["status"] == "succeeded"

    waited = cli_bundle.ksi("wait", "--json", record["task_id"])
    assert waited.returncode == 0
    assert json.loads(waited.stdout)["task_id"] == record["task_id"]

    listed = cli_bundle.ksi("list", "--json", "--limit", "50")
    assert record["task_id"] in {task["task_id"] for task in json.loads(listed.stdout)}


def test_json_queues_and_health(cli_bundle):
    queues = cli_bundle.ksi("queues", "--json")
    assert queues.returncode == 0, queues.stderr
    depth = json.loads(queues.stdout)["claude"]
    assert {"ready", "delayed", "dead"} <= set(depth)

    health = cli_bundle.ksi("health", "--json")
    assert health.returncode == 0
    assert json.loads(health.stdout)["live_workers"] == 2


def test_json_cancel_then_wait_exits_5(cli_bundle):
    task_id = _submit(cli_bundle, "to cancel [stub:slow=60]")
    cancelled = cli_bundle.ksi("cancel", "--json", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] in ("cancelled", "cancelling")
    waited = cli_bundle.ksi("wait", "--json", "--timeout", "60", task_id)
    assert waited.returncode == 5
    assert json.loads(waited.stdout)["status"] == "cancelled"


def test_json_watch_since_replays_events(cli_bundle):
    task_id = _submit(cli_bundle, "replayed task")
    assert cli_bundle.ksi("wait", task_id).returncode == 0
    watched = cli_bundle.ksi(
        "watch", "--json", "--since", "0", "--task", task_id, "--count", "3"
    )
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["event_type"] for e in events] == [
        "TASK_QUEUED",
        "TASK_STARTED",
        "TASK_PROGRESS",
    ]
    assert {e["task_id"] for e in events} == {task_id}


def test_plain_watch_prints_one_line_per_event(cli_bundle):
    task_id = _submit(cli_bundle, "plain watched task")
    assert cli_bundle.ksi("wait", task_id).returncode == 0
    watched = cli_bundle.ksi(
        "watch", "--since", "0", "--task", task_id, "--type", "TASK_COMPLETED",
        "--count", "1",
    )  # fmt: skip
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert len(lines) == 1
    assert "TASK_COMPLETED" in lines[0]
    assert task_id in lines[0]
    assert "\x1b" not in watched.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("wait", "--timeout", "1", "{slow}"), 7),
        (("status", "0123456789abcdef0123456789abcdef"), 6),
        (("submit", "--wait", "--json", "denied [stub:status=401]"), 1),
        (("watch", "--type", "lower-case", "--count", "1"), 6),
    ],
)
def test_exit_codes(cli_bundle, args, code):
    slow = _submit(cli_bundle, "slow for exit code [stub:slow=20]")
    done = cli_bundle.ksi(*(arg.format(slow=slow) for arg in args))
    cli_bundle.ksi("cancel", slow)
    assert done.returncode == code, done.stdout + done.stderr
