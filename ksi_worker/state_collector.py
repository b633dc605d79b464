"""Bundle state read from Redis at scrape time: queues, live workers, Redis.

These values live in Redis rather than in any one process, so the exporter
reads them on each scrape, in one pipelined round trip, instead of having a
process record them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from . import keys
from .presence import HEARTBEAT_TIMEOUT_S
from .queues import dead_key, delayed_messages_key, ready_key

logger = logging.getLogger(__name__)

#: Scrapes between two repeated warnings while Redis stays unreachable.
WARN_EVERY = 60

# KEYS: ready list, message hash. Returns the JSON of the message at the head
# of the ready list (the next one a worker fetches), or nil. One script, so
# a worker fetching that message between two calls cannot make it vanish.
_OLDEST_READY_LUA = """
local message_id = redis.call('LINDEX', KEYS[1], 0)
if not message_id then
    return false
end
return redis.call('HGET', KEYS[2], message_id)
"""


def messages_key(queue: str) -> str:
    """Return the hash of message bodies of a queue (Dramatiq 2.2.1 layout)."""
    return f"{ready_key(queue)}.msgs"


def message_ready_at(raw: bytes | None) -> float | None:
    """Return when a message became ready, in Unix seconds, from its JSON."""
    if not raw:
        return None
    try:
        message = json.loads(raw)
        eta = (message.get("options") or {}).get("eta")
        return float(eta or message["message_timestamp"]) / 1000
    except (ValueError, TypeError, KeyError):
        return None


class BundleStateCollector:
    """Collect queue depths, the oldest ready message, live workers and Redis up.

    Parameters:
      client: Redis client of the bundle; give it a socket timeout so a hung
        Redis cannot hang the scrape.
      queues: Dramatiq queues to report.
    """

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self.client = client
        self.queues = list(queues)
        self._oldest_ready = client.register_script(_OLDEST_READY_LUA)
        self._failures = 0

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ksi_redis_up", "1 when the exporter could read the bundle's Redis."
        )
        try:
            values = self._read()
        except redis.RedisError as error:
            self._failures += 1
            if self._failures % WARN_EVERY == 1:
                logger.warning(
                    "Redis unreachable at scrape %d in a row; queue and worker "
                    "metrics are left out: %s",
                    self._failures,
                    error,
                )
            up.add_metric([], 0)
            yield up
            return
        if self._failures:
            logger.info("Redis reachable again after %d scrapes.", self._failures)
            self._failures = 0
        up.add_metric([], 1)
        yield up
        yield from self._families(values)

    def _read(self) -> list:
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(ready_key(queue))
            pipe.hlen(delayed_messages_key(queue))
            pipe.zcard(dead_key(queue))
            self._oldest_ready(
                keys=[ready_key(queue), messages_key(queue)], client=pipe
            )
        pipe.zcount(keys.WORKERS, time.time() - HEARTBEAT_TIMEOUT_S, "+inf")
        return pipe.execute()

    def _families(self, values: list) -> Iterable[Metric]:
        now = time.time()
        messages = GaugeMetricFamily(
            "ksi_queue_messages",
            "Messages in a Dramatiq queue by state: ready (waiting for a "
            "worker), delayed (a retry or throttled task before its due time), "
            "dead (in the dead-letter queue).",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "ksi_queue_oldest_message_age_seconds",
            "Seconds since the next ready message of a queue became ready; 0 "
            "when none is ready.",
            labels=["queue"],
        )
        for index, queue in enumerate(self.queues):
            ready, delayed, dead, oldest_raw = values[4 * index : 4 * index + 4]
            messages.add_metric([queue, "ready"], ready)
            messages.add_metric([queue, "delayed"], delayed)
            messages.add_metric([queue, "dead"], dead)
            ready_at = message_ready_at(oldest_raw)
            oldest.add_metric([queue], max(0.0, now - ready_at) if ready_at else 0.0)
        workers = GaugeMetricFamily(
            "ksi_workers_live",
            "Worker processes whose heartbeat in Redis is recent enough.",
        )
        workers.add_metric([], values[-1])
        return [messages, oldest, workers]
