"""Plain Celery baseline: one task on the Redis transport with default settings.

Workers run ``celery -A bench.baseline_celery worker`` with
``BENCH_REDIS_URL`` (where the task records its timing) and
``BENCH_CELERY_BROKER`` (the same Redis as a kombu URL) set; the benchmark
process sets ``app.conf.broker_url`` before it calls ``trivial_task.delay``.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from bench.baseline_task import run_and_record

#: Queue of the baseline task.
QUEUE = "bench"

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER"))
app.conf.task_ignore_result = True
app.conf.task_default_queue = QUEUE

_recorder: redis.Redis | None = None


@app.task(name="bench.trivial_task")
def trivial_task(tag: str) -> None:
    global _recorder
    if _recorder is None:
        _recorder = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    run_and_record(_recorder, tag)
