"""Log format of every program, and no secrets in any log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from ksi_worker.logs import JsonFormatter, TextFormatter
from tests.conftest import start_bundle

SECRET_PROMPT = "quokka-zebra-4471 is the secret phrase"
SECRET_KEY = "sk-ant-api03-KSILOGTEST-9f8e7d6c5b4a"


def _record(message: str, *args, exc: bool = False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(
        "ksi_worker.execute", logging.WARNING, __file__, 1, message, args, exc_info
    )
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_object_per_line():
    line = JsonFormatter().format(
        _record("Task %s failed.", "t1", exc=True, task_id="t1", queue="claude")
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "Task t1 failed."
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "ksi_worker.execute"
    assert entry["pid"] == os.getpid()
    assert entry["task_id"] == "t1"
    assert entry["queue"] == "claude"
    assert "ValueError: boom" in entry["exc"]
    assert entry["ts"].endswith("+00:00")


def test_text_formatter_keeps_record_on_one_line():
    line = TextFormatter().format(_record("two\nlines", exc=True))
    assert "\n" not in line
    assert "two\\nlines" in line
    assert "ValueError: boom\\nsecond line" in line


def test_configure_logging_reformats_existing_handlers():
    # Dramatiq's worker processes call logging.basicConfig before they
    # import ksi_worker.actors; the bundle's format must still apply.
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stderr, format="[dramatiq] %(message)s")
        from ksi_worker.logs import configure_logging
        configure_logging()
        logging.getLogger("probe").info("hello %d", 5)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KSI_LOG_FORMAT": "json", "KSI_LOG_LEVEL": "INFO"},
        capture_output=True,
        text=True,
        check=True,
    )
    entry = json.loads(done.stderr.strip())
    assert entry["message"] == "hello 5"
    assert entry["logger"] == "probe"


@pytest.fixture(scope="module")
def json_bundle(stub_api, claude_bin):
    started = start_bundle(
        stub_api,
        claude_bin,
        KSI_LOG_FORMAT="json",
        ANTHROPIC_API_KEY=SECRET_KEY,
    )
    yield started
    left = started.stop()
    assert left == [], f"processes left after shutdown: {left}"
    started.cleanup()


@pytest.mark.bundle
@pytest.mark.timeout(300)
def test_bundle_logs_json_without_secrets(json_bundle):
    done = json_bundle.ksi("submit", "--wait", "--json", SECRET_PROMPT)
    assert done.returncode == 0, done.stderr
    task_id = json.loads(done.stdout)["task_id"]
    failed = json_bundle.ksi(
        "submit", "--wait", "--json", f"{SECRET_PROMPT} [stub:status=401]"
    )
    assert failed.returncode == 1, failed.stderr
    failed_id = json.loads(failed.stdout)["task_id"]
    # supervisord writes child output as it arrives; let it catch up.
    json_bundle.ctl("stop", "ksi:*")

    log_dir = json_bundle.home / "log"
    for path in sorted(log_dir.glob("*")):
        text = path.read_text(errors="replace")
        assert SECRET_PROMPT not in text, path.name
        assert "quokka-zebra-4471" not in text, path.name
        assert SECRET_KEY not in text, path.name
        assert "KSILOGTEST" not in text, path.name

    program_logs = [log_dir / "daemon.log", *sorted(log_dir.glob("worker_*.log"))]
    entries = []
    for path in program_logs:
        for line in path.read_text().splitlines():
            entry = json.loads(line)  # every line of a KSI program is JSON
            assert {"ts", "level", "logger", "pid", "message"} <= set(entry), line
            entries.append({**entry, "file": path.name})
    messages = [entry["message"] for entry in entries]
    assert any(task_id in message for message in messages)
    assert any(failed_id in message for message in messages)
    assert any(entry["logger"].startswith("dramatiq") for entry in entries)
    worker_task_lines = [
        entry
        for entry in entries
        if task_id in entry["message"] and entry["file"].startswith("worker_")
    ]
    assert len(worker_task_lines) >= 2
    assert {entry.get("queue") for entry in worker_task_lines} == {"claude"}
