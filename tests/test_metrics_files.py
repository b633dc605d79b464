"""Housekeeping of the multiprocess folder, with real writer processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from ksi_worker.metrics_files import (
    ProcessFilesCollector,
    mark_dead_processes,
    remove_stale_files,
)

# A process that records a counter and a live gauge, then exits or waits for
# its stdin to close.
WRITER = """
import sys
from prometheus_client import Counter, Gauge, Histogram
Counter("ksi_test_events", "Events.").inc(3)
Gauge("ksi_test_busy", "Busy.", multiprocess_mode="livesum").set(1)
Histogram("ksi_test_seconds", "Seconds.", buckets=(1, 5)).observe(2.0)
print("written", flush=True)
if sys.argv[1] == "stay":
    sys.stdin.read()
"""

STAND_IN = "import sys; print('up', flush=True); sys.stdin.read()"


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def running(folder) -> Iterator[subprocess.Popen]:
    """A writer process that keeps running until the test ends."""
    process = _start_writer(folder, stay=True)
    yield process
    process.stdin.close()
    process.wait(timeout=10)


def _start_writer(folder: Path, *, stay: bool) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, "stay" if stay else "exit"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "written"
    return process


def _exited_writer(folder: Path) -> int:
    process = _start_writer(folder, stay=False)
    assert process.wait(timeout=10) == 0
    return process.pid


def _values(folder: Path) -> dict[str, float]:
    """Return the sums of the folder's files, keyed by sample name and le."""
    collector = MultiProcessCollector(None, str(folder))
    return _by_sample(collector.collect())


def _by_sample(families) -> dict[str, float]:
    values = {}
    for family in families:
        for sample in family.samples:
            le = sample.labels.get("le")
            values[sample.name + (f"[{le}]" if le else "")] = sample.value
    return values


def test_mark_dead_removes_gauge_of_exited_process(folder):
    pid = _exited_writer(folder)
    assert mark_dead_processes(folder) == [pid]
    assert not (folder / f"gauge_livesum_{pid}.db").exists()


def test_mark_dead_keeps_counter_of_exited_process(folder):
    _exited_writer(folder)
    mark_dead_processes(folder)
    assert _values(folder)["ksi_test_events_total"] == 3.0
    assert "ksi_test_busy" not in _values(folder)


def test_mark_dead_keeps_gauge_of_running_process(folder, running):
    assert mark_dead_processes(folder) == []
    assert _values(folder)["ksi_test_busy"] == 1.0


def test_mark_dead_counts_reused_pid_as_dead(folder):
    pid = _exited_writer(folder)
    # A file of an earlier process that had the pid this test runs as now.
    reused = folder / f"gauge_livesum_{os.getpid()}.db"
    shutil.copy(folder / f"gauge_livesum_{pid}.db", reused)
    before_start = psutil.Process().create_time() - 60
    os.utime(reused, (before_start, before_start))
    assert os.getpid() in mark_dead_processes(folder)
    assert not reused.exists()


def test_counters_of_exited_processes_add_up(folder):
    for _ in range(3):
        _exited_writer(folder)
    mark_dead_processes(folder)
    assert _values(folder)["ksi_test_events_total"] == 9.0


def test_collector_matches_plain_sum(folder, running):
    for _ in range(2):
        _exited_writer(folder)
    collected = _by_sample(ProcessFilesCollector(folder).collect())
    assert collected == _values(folder)
    assert collected["ksi_test_events_total"] == 9.0
    assert collected["ksi_test_busy"] == 1.0
    assert collected["ksi_test_seconds_bucket[5.0]"] == 3.0
    assert collected["ksi_test_seconds_bucket[1.0]"] == 0.0
    assert collected["ksi_test_seconds_count"] == 3.0
    assert collected["ksi_test_seconds_sum"] == 6.0


def test_collector_rereads_when_another_process_exits(folder, running):
    collector = ProcessFilesCollector(folder)
    _exited_writer(folder)
    assert _by_sample(collector.collect())["ksi_test_events_total"] == 6.0
    _exited_writer(folder)
    assert _by_sample(collector.collect())["ksi_test_events_total"] == 9.0


def test_collector_drops_gauge_of_exited_process(folder):
    _exited_writer(folder)
    assert "ksi_test_busy" not in _by_sample(ProcessFilesCollector(folder).collect())


def test_remove_stale_files_keeps_running_process(folder, running):
    dead = _exited_writer(folder)
    removed = remove_stale_files(folder, supervisord_pidfile=folder / "none.pid")
    assert sorted(path.name for path in removed) == [
        f"counter_{dead}.db",
        f"gauge_livesum_{dead}.db",
        f"histogram_{dead}.db",
    ]
    assert sorted(path.name for path in folder.iterdir()) == [
        f"counter_{running.pid}.db",
        f"gauge_livesum_{running.pid}.db",
        f"histogram_{running.pid}.db",
    ]


def test_remove_stale_files_skipped_while_supervisord_runs(folder, tmp_path):
    _exited_writer(folder)
    # A live process whose command line names supervisord takes its place.
    stand_in = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, "supervisord"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stand_in.stdout.readline().strip() == "up"
        pidfile = tmp_path / "supervisord.pid"
        pidfile.write_text(f"{stand_in.pid}\n")
        assert remove_stale_files(folder, supervisord_pidfile=pidfile) == []
    finally:
        stand_in.stdin.close()
        stand_in.wait(timeout=10)
    assert len(list(folder.iterdir())) == 3


def test_remove_stale_files_after_supervisord_exited(folder, tmp_path):
    _exited_writer(folder)
    pidfile = tmp_path / "supervisord.pid"
    pidfile.write_text("999999999\n")
    assert len(remove_stale_files(folder, supervisord_pidfile=pidfile)) == 3
