"""The ``metrics`` program: one Prometheus ``/metrics`` endpoint for the bundle.

Run as ``python -m ksi_worker.exporter``. It serves, on ``KSI_METRICS_ADDR``:

- the sum of every process's multiprocess files in ``PROMETHEUS_MULTIPROC_DIR``
  (default ``KSI_HOME/prometheus``): workers, daemon and reaper. Before each
  scrape it removes the live gauges of processes that exited.
- queue depths, the oldest ready message, live workers and whether Redis is
  up, read from Redis at scrape time.

It records no metrics of its own, so it never writes to that folder except to
remove dead processes' gauges.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, start_http_server

from .logs import configure_logging
from .metrics_files import ProcessFilesCollector
from .settings import Settings, SettingsError
from .state_collector import BundleStateCollector

logger = logging.getLogger(__name__)

#: Seconds a scrape waits for Redis before it reports ``ksi_redis_up 0``.
REDIS_TIMEOUT_S = 2.0


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(
            f"KSI_METRICS_ADDR={addr!r} is not host:port; use for example "
            "127.0.0.1:9870"
        )
    return host, int(port)


def multiprocess_folder(settings: Settings) -> Path:
    """Return the folder that the bundle's processes write metrics into."""
    return Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.prometheus_dir)


def build_registry(settings: Settings, folder: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ProcessFilesCollector(folder))
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
    )
    registry.register(BundleStateCollector(client, [settings.queue]))
    return registry


def main() -> int:
    configure_logging()
    try:
        settings = Settings.from_env()
        host, port = parse_addr(settings.metrics_addr)
    except SettingsError as error:
        logger.error("Invalid setting: %s", error)
        return 2
    folder = multiprocess_folder(settings)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = build_registry(settings, folder)

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        logger.error(
            "Cannot listen on %s: %s; set KSI_METRICS_ADDR to a free host:port.",
            settings.metrics_addr,
            error,
        )
        return 1
    logger.info(
        "Serving /metrics on %s (pid %d), summing the files in %s.",
        settings.metrics_addr,
        os.getpid(),
        folder,
    )

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    stop.wait()
    logger.info("Metrics exporter stopping.")
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
