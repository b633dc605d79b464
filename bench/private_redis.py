"""A throwaway redis-server on a unix socket in a temporary folder."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import redis

#: Seconds a new redis-server may take to accept connections.
START_TIMEOUT_S = 10.0


class PrivateRedis:
    """A redis-server with no TCP port and no persistence, for one baseline.

    The socket lives in a new folder under /tmp, so nothing else connects to
    it by accident. ``stop()`` ends the server and deletes the folder.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ksi-bench-redis-", dir="/tmp"))
        self.socket = self.folder / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of the server."""
        return f"unix://{self.socket}?db=0"

    @property
    def kombu_url(self) -> str:
        """The same server as a kombu (Celery) broker URL."""
        return f"redis+socket://{self.socket}"

    def start(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket)]
            + ["--dir", str(self.folder), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server on {self.socket} did not start within "
                        f"{START_TIMEOUT_S} s; is redis-server on PATH?"
                    ) from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def psutil_process(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
