"""QUEUE_TASK interrupted by a daemon stop or a Redis failure loses no task.

The daemon's Commands run in this process on a real Redis. The stores below
add a delay or one failure to ``TaskStore.create``, so that the stop or the
failure hits QUEUE_TASK while it writes the task. Either can leave a record
that no message carries, or an idempotency key that names no task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from daemon.commands import Commands
from ksi_worker import keys
from ksi_worker.settings import Settings
from ksi_worker.store import TaskStore


class SlowCreateStore(TaskStore):
    """A store whose task creation takes ``delay_s`` longer."""

    delay_s = 0.5

    def create(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay_s)
        return super().create(*args, **kwargs)


class FailingCreateStore(TaskStore):
    """A store whose first task creation fails as if Redis had restarted."""

    failures_left = 1

    def create(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures_left:
            self.failures_left -= 1
            raise redis.ConnectionError("Connection closed by server.")
        return super().create(*args, **kwargs)


@pytest.fixture
def settings(redis_server, tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("KSI_HOME", str(tmp_path))
    monkeypatch.setenv("KSI_REDIS_URL", redis_server)
    return Settings.from_env()


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server)
    yield connection
    connection.close()


def _task_ids(client: redis.Redis) -> list[str]:
    return [task_id.decode() for task_id in client.zrange(keys.TASK_INDEX, 0, -1)]


@pytest.mark.parametrize("idempotency_key", [None, "stop-mid-create"])
def test_stop_during_queue_task_leaves_no_unsent_task(
    settings, client, idempotency_key
):
    sent: list[str] = []
    store = SlowCreateStore(client)
    commands = Commands(settings, store, sent.append)
    params = {"prompt": "hello"}
    if idempotency_key:
        params["idempotency_key"] = idempotency_key

    async def stop_mid_create() -> None:
        request = asyncio.create_task(commands.queue_task(params))
        await asyncio.sleep(SlowCreateStore.delay_s / 2)
        # What asyncio.run does to open requests when the daemon stops.
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request

    # asyncio.run returns once the threads of to_thread calls have ended.
    asyncio.run(stop_mid_create())
    created = _task_ids(client)
    assert sorted(sent) == created


def test_redis_failure_during_create_frees_idempotency_key(settings, client):
    sent: list[str] = []
    store = FailingCreateStore(client)
    commands = Commands(settings, store, sent.append)
    params = {"prompt": "hello", "idempotency_key": "redis-restart"}

    with pytest.raises(redis.ConnectionError):
        asyncio.run(commands.queue_task(params))
    # The client retries with the same key, as it must after an error reply.
    reply = asyncio.run(commands.queue_task(params))

    assert reply.get("duplicate") is not True
    assert client.exists(keys.task(reply["task_id"])) == 1
    assert sent == [reply["task_id"]]
    assert _task_ids(client) == [reply["task_id"]]
