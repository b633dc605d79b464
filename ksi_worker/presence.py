"""Worker heartbeats in Redis, so the daemon and the reaper see live workers.

Dramatiq's own heartbeats (``dramatiq:__heartbeats__``) also count every
process that only enqueues, the daemon included, and carry no pid, so workers
announce themselves here with their pid and create time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import psutil
import redis
from dramatiq import Middleware

from . import keys

logger = logging.getLogger(__name__)

#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL_S = 2.0

#: Seconds without a heartbeat after which a worker counts as gone.
HEARTBEAT_TIMEOUT_S = 10.0


def worker_identity() -> dict[str, object]:
    """Return the pid, create time and host of the current process."""
    pid = os.getpid()
    return {
        "pid": pid,
        "create_time": psutil.Process(pid).create_time(),
        "host": socket.gethostname(),
    }


def worker_id_of(identity: dict[str, object]) -> str:
    return f"{identity['host']}:{identity['pid']}"


def live_workers(client: redis.Redis, *, now: float | None = None) -> list[dict]:
    """Return the workers whose last heartbeat is recent enough."""
    now = time.time() if now is None else now
    worker_ids = client.zrangebyscore(keys.WORKERS, now - HEARTBEAT_TIMEOUT_S, "+inf")
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.hgetall(keys.worker(worker_id.decode()))
    workers = []
    for worker_id, raw in zip(worker_ids, pipe.execute(), strict=True):
        if raw:
            info = {k.decode(): v.decode() for k, v in raw.items()}
            info["worker_id"] = worker_id.decode()
            workers.append(info)
    return workers


class WorkerPresence(Middleware):
    """Publish a heartbeat for this worker process every few seconds.

    Parameters:
      client: Redis client used for the heartbeats.
      threads: Number of worker threads, published for operators.
    """

    def __init__(self, client: redis.Redis, *, threads: int) -> None:
        self.client = client
        self.threads = threads
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.worker_id = ""

    def after_worker_boot(self, broker, worker) -> None:
        identity = worker_identity()
        self.worker_id = worker_id_of(identity)
        self.info = {**identity, "threads": self.threads, "started_at": time.time()}
        self.thread = threading.Thread(
            target=self._beat, name="ksi-heartbeat", daemon=True
        )
        self.thread.start()
        logger.info("Worker %s started with %d threads.", self.worker_id, self.threads)

    def before_worker_shutdown(self, broker, worker) -> None:
        self.info["stopping"] = 1
        try:
            self.client.hset(keys.worker(self.worker_id), "stopping", "1")
        except redis.RedisError as error:
            logger.warning(
                "Worker %s could not mark itself stopping: %s", self.worker_id, error
            )
        logger.info("Worker %s is shutting down.", self.worker_id)

    def after_worker_shutdown(self, broker, worker) -> None:
        # Heartbeats go on while running tasks drain, so Redis is kept up
        # (see ksi_worker.redis_guard) until the last worker has left.
        self.stopping.set()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(keys.WORKERS, self.worker_id)
            pipe.delete(keys.worker(self.worker_id))
            pipe.execute()
        except redis.RedisError as error:
            logger.warning(
                "Worker %s could not remove its heartbeat: %s", self.worker_id, error
            )
        logger.info("Worker %s stopped.", self.worker_id)

    def _beat(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.hset(
                    keys.worker(self.worker_id),
                    mapping={k: str(v) for k, v in self.info.items()},
                )
                pipe.expire(keys.worker(self.worker_id), int(HEARTBEAT_TIMEOUT_S * 3))
                pipe.zadd(keys.WORKERS, {self.worker_id: time.time()})
                pipe.execute()
                if failures:
                    logger.info("Worker %s heartbeat restored.", self.worker_id)
                failures = 0
            except redis.RedisError as error:
                failures += 1
                if failures == 1 or failures % 12 == 0:
                    logger.warning(
                        "Worker %s heartbeat failed %d times: %s",
                        self.worker_id,
                        failures,
                        error,
                    )
            self.stopping.wait(HEARTBEAT_INTERVAL_S)
