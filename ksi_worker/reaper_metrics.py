"""Prometheus metrics of the reaper.

Plain prometheus_client metrics. When ``PROMETHEUS_MULTIPROC_DIR`` is set
before this module is imported, prometheus_client writes their values to files
in that folder, from which the bundle's metrics endpoint reads them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Reasons a reaper kill is counted under, as in ``ksi_worker.reaper.Reason``.
KILL_REASONS = ("task_not_running", "worker_gone", "deadline_exceeded")

KILLS = Counter(
    "ksi_reaper_kills_total",
    "Processes the reaper sent SIGTERM to, by reason.",
    ["reason"],
)
SCAN_SECONDS = Histogram(
    "ksi_reaper_scan_seconds",
    "Time one reaper scan took to read the process table and judge markers.",
)
ORPHANS = Gauge(
    "ksi_reaper_orphans",
    "Orphaned processes that the latest reaper scan found.",
    multiprocess_mode="livemax",
)
SCANS = Counter("ksi_reaper_scans_total", "Reaper scans completed.")

# Every reason shows as 0 from the start, so rate() and alerts see the series.
for _reason in KILL_REASONS:
    KILLS.labels(reason=_reason)


class PrometheusReaperMetrics:
    """Records the reaper's scans and kills in the module's metrics."""

    def observe_scan(self, duration_s: float, orphans: int) -> None:
        SCANS.inc()
        SCAN_SECONDS.observe(duration_s)
        ORPHANS.set(orphans)

    def count_kill(self, reason: str) -> None:
        KILLS.labels(reason=reason).inc()
