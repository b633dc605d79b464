"""Start and stop a whole ksi:* bundle under a real supervisord for tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psutil
import redis

from daemon.client import DaemonClient
from ksi_worker.settings import PROJECT_ROOT, default_redis_url

BIN = Path(sys.executable).parent


class Bundle:
    """One bundle in its own KSI_HOME, run by its own supervisord.

    Parameters:
      env: Extra environment variables (KSI_WORKERS, ANTHROPIC_BASE_URL...).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        # Unix socket paths are limited to 107 bytes, so keep KSI_HOME short.
        self.home = Path(tempfile.mkdtemp(prefix="ksi-", dir="/tmp"))
        self.env = {
            **os.environ,
            "KSI_HOME": str(self.home),
            "KSI_RETRY_MIN_BACKOFF_S": "0.5",
            "KSI_RETRY_MAX_BACKOFF_S": "2",
            "KSI_STOP_WAIT_S": "20",
            "KSI_KILL_GRACE_S": "2",
            **env,
        }
        self.workers = int(self.env.get("KSI_WORKERS", "2"))

    def start(self, timeout_s: float = 60) -> None:
        subprocess.run([BIN / "ksi-supervisord"], env=self.env, check=True)
        self.wait_running(timeout_s)

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "ksi-supervisorctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
        )

    def ksi(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "ksi", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def redis(self) -> redis.Redis:
        """Return a client of the bundle's Redis, with its password."""
        return redis.Redis.from_url(default_redis_url(self.home))

    def client(self) -> DaemonClient:
        return DaemonClient(self.home / "run" / "ksi.sock")

    def program_states(self) -> dict[str, str]:
        states = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                states[parts[0]] = parts[1]
        return states

    def expected_programs(self) -> set[str]:
        workers = {f"ksi:worker_{n:02d}" for n in range(self.workers)}
        return {"ksi:redis", "ksi:daemon", "ksi:metrics", "ksi:reaper", *workers}

    def wait_running(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.program_states()
            running = {name for name, state in states.items() if state == "RUNNING"}
            if (
                self.expected_programs() <= running
                and self._live_workers() >= self.workers
            ):
                return
            time.sleep(0.25)
        raise AssertionError(
            f"bundle not running after {timeout_s} s: {self.program_states()}\n"
            + self.logs_tail()
        )

    def _live_workers(self) -> int:
        try:
            with self.client() as client:
                return client.request("HEALTH_CHECK").get("live_workers", 0)
        except Exception:
            return 0

    def logs_tail(self, lines: int = 20) -> str:
        out = []
        for path in sorted((self.home / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def supervisord_pid(self) -> int | None:
        try:
            return int((self.home / "run" / "supervisord.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def processes(self) -> list[psutil.Process]:
        """Return every live process started for this bundle."""
        home = str(self.home)
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid == os.getpid():
                    continue
                environ = process.environ()
                cmdline = " ".join(process.cmdline())
            except (psutil.Error, OSError):
                continue
            if environ.get("KSI_HOME") == home or home in cmdline:
                found.append(process)
        return found

    def stop(self) -> list[str]:
        """Shut supervisord down and return what is left running, killed."""
        pid = self.supervisord_pid()
        self.ctl("shutdown")
        if pid is not None:
            try:
                psutil.Process(pid).wait(timeout=60)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 10
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.processes()
        described = []
        for process in left:
            try:
                described.append(f"{process.pid} {' '.join(process.cmdline())}")
                process.kill()
            except psutil.Error:
                pass
        return described

    def finish(self) -> None:
        """Stop the bundle, delete its KSI_HOME, and fail if a process is left."""
        left = self.stop()
        self.cleanup()
        assert left == [], f"processes left after shutdown: {left}"

    def submit(self, prompt: str, **params) -> str:
        """Queue a task through the daemon socket and return its id."""
        with self.client() as client:
            return client.request("QUEUE_TASK", prompt=prompt, **params)["task_id"]

    def record(self, task_id: str) -> dict:
        """Return a task's record from TASK_STATUS."""
        with self.client() as client:
            return client.request("TASK_STATUS", task_id=task_id)

    def cleanup(self) -> None:
        """Delete KSI_HOME, unless KSI_TEST_KEEP_HOME=1 keeps it for debugging."""
        if os.environ.get("KSI_TEST_KEEP_HOME") != "1":
            shutil.rmtree(self.home, ignore_errors=True)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_claude_bin() -> str:
    return str(PROJECT_ROOT / "node_modules" / ".bin" / "claude")
