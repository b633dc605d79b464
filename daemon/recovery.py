"""Notice tasks whose worker died and show them as waiting for redelivery.

A worker killed mid-task cannot record anything. Dramatiq returns its
unacknowledged message to the queue once the worker's broker heartbeat is
older than ``KSI_BROKER_HEARTBEAT_TIMEOUT_S``, and the next attempt starts
from there. Until then the task record would still show ``running``, so the
daemon checks every running task's worker: by pid and create time when the
worker ran on this host, by its KSI heartbeat otherwise. A task whose worker
is gone becomes ``retrying`` with the error class ``worker_lost``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import psutil
import redis

from ksi_worker.lifecycle import EventType, TaskStatus
from ksi_worker.presence import live_workers
from ksi_worker.store import TaskStore

logger = logging.getLogger(__name__)

#: Seconds between two checks of the running tasks' workers.
SWEEP_INTERVAL_S = 2.0


def local_process_alive(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class WorkerLossSweeper:
    """Periodically move tasks of dead workers from ``running`` to ``retrying``.

    Parameters:
      store: Task store on the bundle's Redis.
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.host = socket.gethostname()

    def sweep(self) -> list[str]:
        """Check every running task once; return the ids marked worker_lost."""
        live = {worker["worker_id"] for worker in live_workers(self.store.client)}
        lost = []
        for task_id in self.store.running_task_ids():
            record = self.store.get(task_id)
            if not record or record.get("status") != TaskStatus.RUNNING.value:
                continue
            if self._worker_alive(record, live):
                continue
            message = (
                f"worker_lost: worker {record.get('worker_id')} died during attempt "
                f"{record.get('attempt')}; the broker returns the message to the "
                "queue and the task runs again"
            )
            applied, _, attempt = self.store.transition(
                task_id,
                allowed_from=(TaskStatus.RUNNING,),
                fields={
                    "status": TaskStatus.RETRYING.value,
                    "error": message,
                    "error_class": "worker_lost",
                },
                event_type=EventType.TASK_RETRYING,
                payload={"error_class": "worker_lost", "delay_s": None},
                # A next attempt may have started since the record was read.
                require={
                    "attempt": record.get("attempt"),
                    "worker_id": record.get("worker_id"),
                },
            )
            if applied:
                logger.warning(
                    "Task %s attempt %d lost its worker %s; waiting for redelivery.",
                    task_id,
                    attempt,
                    record.get("worker_id"),
                )
                lost.append(task_id)
        return lost

    def _worker_alive(self, record: dict, live: set[str]) -> bool:
        worker_id = record.get("worker_id")
        if not worker_id:
            return True
        if record.get("worker_host") == self.host and record.get("worker_created"):
            return local_process_alive(
                int(record["worker_pid"]), float(record["worker_created"])
            )
        return worker_id in live

    async def run_forever(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.sweep)
                failures = 0
            except redis.RedisError as error:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    logger.warning(
                        "Worker-loss check failed %d times: %s", failures, error
                    )
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, SWEEP_INTERVAL_S - elapsed))
