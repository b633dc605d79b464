"""Shared fixtures: the Messages API stand-in, Redis, and whole bundles."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.bundle import Bundle, free_port, project_claude_bin

FAKE_CLAUDE = Path(__file__).with_name("fake_claude.py")


def _wait_for_file(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout_s} s")


@pytest.fixture(scope="session")
def stub_api() -> Iterator[str]:
    """Run the local Messages API stand-in; yield its base URL."""
    folder = Path(tempfile.mkdtemp(prefix="ksi-stub-"))
    port_file = folder / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "stubapi", "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "stub.log", "wb"),  # noqa: SIM115
    )
    try:
        port = _wait_for_file(port_file, 15)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """Path of the real, pinned Claude CLI."""
    path = os.environ.get("KSI_CLAUDE_BIN") or project_claude_bin()
    if not Path(path).exists():
        pytest.fail(f"the pinned Claude CLI is missing at {path}; run scripts/setup")
    return path


def _run_redis() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="ksi-redis-"))
    sock = folder / "redis.sock"
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{sock}?db=0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[str]:
    """Run a private redis-server on a unix socket; yield its URL."""
    yield from _run_redis()


@pytest.fixture(scope="module")
def redis_server_module() -> Iterator[str]:
    """Like redis_server, shared by the tests of one module."""
    yield from _run_redis()


def start_bundle(stub_url: str, claude_path: str, **env: str) -> Bundle:
    bundle = Bundle(
        {
            "ANTHROPIC_BASE_URL": stub_url,
            "ANTHROPIC_API_KEY": "stub-key",
            "KSI_CLAUDE_BIN": claude_path,
            # Bundles of parallel test runs must not share the default port.
            "KSI_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            **env,
        }
    )
    try:
        bundle.start()
    except BaseException:
        bundle.stop()
        raise
    return bundle


@pytest.fixture(scope="module")
def bundle(stub_api, claude_bin) -> Iterator[Bundle]:
    """A running bundle with 2 workers and the real CLI against the stand-in."""
    started = start_bundle(stub_api, claude_bin)
    yield started
    started.finish()


@dataclass
class DaemonProcess:
    """A ``python -m daemon`` started by a test, on a private Redis."""

    socket: Path
    process: subprocess.Popen
    log: Path
    redis_url: str


def start_daemon(redis_url: str, *, preexec_fn=None, **env: str) -> DaemonProcess:
    """Start the daemon with no workers and wait for its socket."""
    home = Path(tempfile.mkdtemp(prefix="ksi-d-", dir="/tmp"))
    log = home / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon"],
        env={**os.environ, "KSI_HOME": str(home), "KSI_REDIS_URL": redis_url, **env},
        stderr=log.open("wb"),
        preexec_fn=preexec_fn,
    )
    sock = home / "run" / "ksi.sock"
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "daemon socket never appeared"
        time.sleep(0.05)
    return DaemonProcess(sock, process, log, redis_url)


def stop_daemon(daemon: DaemonProcess) -> None:
    """Stop the daemon and check that it exited cleanly."""
    if daemon.process.poll() is None:
        daemon.process.terminate()
    assert daemon.process.wait(timeout=15) == 0, daemon.log.read_text()
