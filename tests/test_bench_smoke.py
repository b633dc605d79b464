"""The benchmark entry point runs end to end with tiny counts.

It starts a KSI bundle, plain Dramatiq and Celery workers, a bundle with the
real CLI and the stand-in API, and the setups of the older bench scripts. A
change that breaks any of them fails here rather than at the next full run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import SUMMARY_END, SUMMARY_START

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Rows that the smoke run must fill with a number for KSI.
EXPECTED_ROWS = [
    "| dispatch p50, send to child start |",
    "| pickup after 0.2 s idle p50, to child |",
    "| idle CPU of the group |",
    "| throughput, 20 tasks |",
    "| worker program RSS (parent + child) |",
    "| ksi submit --wait, same call |",
    "| event fan-out, 5 subscribers |",
    "| reaper scan, 50 unrelated processes |",
    "| /metrics scrape, 2 worker processes (3 scrapes) |",
]


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    output.write_text("# Benchmark results\n\n## Kept section\n\nhand-written\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output.read_text()


@pytest.mark.parametrize("row", EXPECTED_ROWS)
def test_bench_smoke_fills_row(smoke_output: str, row: str) -> None:
    line = next(
        (line for line in smoke_output.splitlines() if line.startswith(row)), ""
    )
    assert line, f"row {row!r} missing from:\n{smoke_output}"
    ksi_cell = line.split("|")[3].strip()
    assert ksi_cell[:1].isdigit(), f"no KSI value in {line!r}"


def test_bench_smoke_fills_every_system(smoke_output: str) -> None:
    row = next(
        line
        for line in smoke_output.splitlines()
        if line.startswith("| dispatch p50, send to child start |")
    )
    cells = [cell.strip() for cell in row.split("|")[3:6]]
    assert all(cell[:1].isdigit() for cell in cells), row


def test_bench_smoke_keeps_other_sections(smoke_output: str) -> None:
    assert "## Kept section\n\nhand-written" in smoke_output


def test_bench_smoke_summary_once_at_top(smoke_output: str) -> None:
    assert smoke_output.count(SUMMARY_START) == 1
    assert smoke_output.index(SUMMARY_END) < smoke_output.index("## Kept section")
