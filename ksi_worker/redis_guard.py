"""Run redis-server and delay its shutdown until stopping workers have left.

``supervisorctl stop ksi:*`` signals every program of the group at once, so
Redis would exit while workers still drain their running tasks and need it to
record the outcome. This wrapper starts redis-server as its child. On SIGTERM
it waits until no worker of this host is in its drain window (workers mark
themselves ``stopping`` in their heartbeat record), at most ``KSI_STOP_WAIT_S``
plus 5 seconds, then passes SIGTERM on. Redis restarted alone stops at once.

Usage: ``python -m ksi_worker.redis_guard redis-server CONFIG [ARGS...]``.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import redis

from .logs import configure_logging
from .presence import live_workers
from .settings import Settings

logger = logging.getLogger("ksi_worker.redis_guard")

#: Seconds to let workers signalled together with Redis mark themselves
#: stopping before the guard looks.
SETTLE_S = 1.5


def draining_workers(client: redis.Redis, host: str) -> list[str]:
    return [
        worker["worker_id"]
        for worker in live_workers(client)
        if worker.get("host") == host and worker.get("stopping") == "1"
    ]


def wait_for_drain(settings: Settings) -> None:
    time.sleep(SETTLE_S)
    deadline = time.monotonic() + settings.stop_wait_s + 5
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    host = socket.gethostname()
    logged: list[str] = []
    while time.monotonic() < deadline:
        try:
            waiting = draining_workers(client, host)
        except redis.RedisError as error:
            logger.warning("Cannot read worker heartbeats (%s); stopping Redis.", error)
            return
        if not waiting:
            return
        if waiting != logged:
            logger.info("Redis stop waits for draining workers %s.", waiting)
            logged = waiting
        time.sleep(0.5)
    logger.warning(
        "Workers %s still drain after the stop window; stopping Redis.", logged
    )


def main(argv: list[str]) -> int:
    configure_logging()
    if not argv:
        logger.error("usage: python -m ksi_worker.redis_guard redis-server [ARGS...]")
        return 2
    settings = Settings.from_env()
    child = subprocess.Popen(argv)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while child.poll() is None and not stop_requested.wait(0.5):
        pass
    if child.poll() is None:
        logger.info("Stop requested for redis-server pid %d.", child.pid)
        wait_for_drain(settings)
        child.send_signal(signal.SIGTERM)
    returncode = child.wait()
    logger.info("redis-server pid %d exited with code %d.", child.pid, returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
