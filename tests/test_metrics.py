"""Metrics of a whole bundle, scraped by a real Prometheus while tasks run.

One bundle with two workers runs the real Claude CLI against the local
Messages API stand-in; a Prometheus started here scrapes its /metrics every
second. The tests run in file order: the worker restart and the SIGKILL come
last, after the counts of the first workload are checked.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksi_worker.settings import PROJECT_ROOT
from tests.bundle import Bundle, free_port
from tests.conftest import start_bundle

pytestmark = [pytest.mark.bundle, pytest.mark.timeout(300)]

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "ksi.json"
RULES = PROJECT_ROOT / "deploy" / "prometheus" / "rules.yml"
SUCCEEDED = 5
FAILED = 1
TOKEN_FIELDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
}
#: Labels whose values are unbounded, which no metric may carry.
FORBIDDEN_LABELS = {"pid", "task_id", "session_id", "claude_session_id"}


class Prometheus:
    """A Prometheus server on loopback that scrapes one target every second."""

    def __init__(self, target: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ksi-prom-", dir="/tmp"))
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "ksi", "static_configs": [{"targets": [target]}]}
            ],
        }
        # JSON is valid YAML, and no YAML library is installed.
        (self.folder / "prometheus.json").write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing; install Debian's prometheus package")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.folder / 'prometheus.json'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "prometheus.log", "wb"),  # noqa: SIM115
        )
        wait_for(self._ready, 30, "Prometheus never became ready")

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return (self.folder / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(
                f"{self.url}{path}?{query}", timeout=10
            ) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{params}: {error.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """Return the single value of ``expr``, or None when it has no data."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else None


def wait_for(check: Callable[[], bool], timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout_s} s")
        time.sleep(0.25)


def scrape(bundle: Bundle) -> str:
    url = f"http://{bundle.env['KSI_METRICS_ADDR']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def exposed(bundle: Bundle, name: str, **labels: str) -> float:
    """Return the sum of the samples of ``name`` that carry ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(scrape(bundle)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def submit(bundle: Bundle, prompt: str) -> str:
    done = bundle.ksi("submit", "--json", prompt)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["task_id"]


def record(bundle: Bundle, task_id: str) -> dict[str, Any]:
    return json.loads(bundle.ksi("status", "--json", task_id).stdout)


def worker_child(bundle: Bundle, program: str) -> psutil.Process:
    """Return the Dramatiq worker process (the child) of a worker program."""
    pid = int(bundle.ctl("pid", program).stdout.strip())
    children = psutil.Process(pid).children()
    assert len(children) == 1, f"{program} has children {children}"
    return children[0]


def kill_task_processes(task_id: str) -> None:
    """Kill what is left of a task's Claude runs, such as the killed worker's CLI."""
    for process in psutil.process_iter():
        try:
            if process.environ().get("KSI_TASK_ID") == task_id:
                process.kill()
        except (psutil.Error, OSError):
            continue


def counter_resets(prometheus: Prometheus) -> dict[str, str]:
    """Return the ksi_*_total series that Prometheus saw decrease in 10 minutes."""
    names = prometheus.api("/api/v1/label/__name__/values")
    counters = [name for name in names if re.fullmatch(r"ksi_\w+_total", name)]
    assert "ksi_tasks_total" in counters
    found = {}
    for name in counters:
        for series in prometheus.query(f"resets({name}[10m]) > 0"):
            labels = json.dumps(series["metric"], sort_keys=True)
            found[f"{name}{labels}"] = series["value"][1]
    return found


@pytest.fixture(scope="module")
def metrics_bundle(stub_api, claude_bin) -> Iterator[Bundle]:
    started = start_bundle(
        stub_api,
        claude_bin,
        KSI_WORKERS="2",
        # A SIGKILLed worker's message comes back within seconds.
        KSI_BROKER_HEARTBEAT_TIMEOUT_S="5",
        KSI_BROKER_MAINTENANCE_S="1",
        # Several reaper scans fall in the dashboard's rate window.
        KSI_REAPER_INTERVAL_S="1",
    )
    yield started
    left = started.stop()
    started.cleanup()
    assert left == [], f"processes left after shutdown: {left}"


@pytest.fixture(scope="module")
def prometheus(metrics_bundle) -> Iterator[Prometheus]:
    server = Prometheus(metrics_bundle.env["KSI_METRICS_ADDR"])
    server.start()
    # Prometheus starts scraping a few seconds after it is ready; rates and
    # percentiles need samples from before the workload.
    wait_for(
        lambda: server.value('up{job="ksi"}') == 1,
        30,
        "Prometheus did not scrape the bundle",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workload(metrics_bundle, prometheus) -> list[dict[str, Any]]:
    """Run 5 tasks that succeed and 1 that fails for good; return the records."""
    task_ids = [submit(metrics_bundle, f"metrics task {n}") for n in range(SUCCEEDED)]
    task_ids.append(submit(metrics_bundle, "metrics failure [stub:status=401]"))
    records = []
    for task_id in task_ids:
        metrics_bundle.ksi("wait", "--timeout", "120", task_id)
        records.append(record(metrics_bundle, task_id))
    statuses = sorted(r["status"] for r in records)
    assert statuses == ["failed"] + ["succeeded"] * SUCCEEDED, (
        metrics_bundle.logs_tail()
    )
    wait_for(
        lambda: (
            prometheus.value('sum(ksi_tasks_total{outcome=~"succeeded|failed"})')
            == SUCCEEDED + FAILED
        ),
        30,
        "Prometheus did not scrape the outcomes of the workload",
    )
    return records


def test_exposition_parses(metrics_bundle, workload):
    families = {
        f.name: f for f in text_string_to_metric_families(scrape(metrics_bundle))
    }
    expected = {
        "ksi_task_queue_wait_seconds": "histogram",
        "ksi_claude_run_seconds": "histogram",
        "ksi_task_end_to_end_seconds": "histogram",
        "ksi_tasks": "counter",
        "ksi_task_retries": "counter",
        "ksi_task_dead_letters": "counter",
        "ksi_claude_cost_usd": "counter",
        "ksi_claude_tokens": "counter",
        "ksi_tasks_in_progress": "gauge",
        "ksi_queue_messages": "gauge",
        "ksi_queue_oldest_message_age_seconds": "gauge",
        "ksi_workers_live": "gauge",
        "ksi_redis_up": "gauge",
        "ksi_daemon_connections": "gauge",
        "ksi_daemon_commands": "counter",
    }
    assert {name: families[name].type for name in expected if name in families} == (
        expected
    )


def test_exposition_has_no_unbounded_labels(metrics_bundle, workload):
    labels = set()
    for family in text_string_to_metric_families(scrape(metrics_bundle)):
        for sample in family.samples:
            labels |= set(sample.labels)
    assert labels & FORBIDDEN_LABELS == set()


def test_exposition_has_no_dramatiq_metrics(metrics_bundle, workload):
    names = [f.name for f in text_string_to_metric_families(scrape(metrics_bundle))]
    assert [name for name in names if not name.startswith("ksi_")] == []


def test_outcome_counters_match_tasks(prometheus, workload):
    assert prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})') == SUCCEEDED
    assert prometheus.value('sum(ksi_tasks_total{outcome="failed"})') == FAILED
    assert prometheus.value('sum(ksi_tasks_total{outcome="timed_out"})') == 0
    assert prometheus.value("sum(ksi_task_retries_total)") == 0


def test_dead_letter_counted_and_queued(prometheus, workload):
    assert prometheus.value("sum(ksi_task_dead_letters_total)") == FAILED
    assert prometheus.value('sum(ksi_queue_messages{state="dead"})') == FAILED


def test_latency_histograms_count_each_task(prometheus, workload):
    for name in (
        "ksi_task_queue_wait_seconds",
        "ksi_claude_run_seconds",
        "ksi_task_end_to_end_seconds",
    ):
        assert prometheus.value(f"sum({name}_count)") == SUCCEEDED + FAILED, name


def test_run_time_matches_records(prometheus, workload):
    elapsed = sum(r["elapsed_s"] for r in workload)
    assert prometheus.value("sum(ksi_claude_run_seconds_sum)") == pytest.approx(
        elapsed, abs=0.01
    )


def test_cost_matches_records(prometheus, workload):
    cost = sum(r.get("cost_usd") or 0 for r in workload)
    assert cost > 0
    assert prometheus.value("sum(ksi_claude_cost_usd_total)") == pytest.approx(cost)


@pytest.mark.parametrize("kind", sorted(TOKEN_FIELDS))
def test_tokens_match_records(prometheus, workload, kind):
    tokens = sum((r.get("usage") or {}).get(TOKEN_FIELDS[kind]) or 0 for r in workload)
    expr = f'sum(ksi_claude_tokens_total{{kind="{kind}"}})'
    assert prometheus.value(expr) == tokens


def test_live_workers_and_redis_up(prometheus, workload):
    assert prometheus.value("ksi_workers_live") == 2
    assert prometheus.value("ksi_redis_up") == 1


def test_dashboard_panels_return_data(metrics_bundle, prometheus, workload):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {
        "$instance": metrics_bundle.env["KSI_METRICS_ADDR"],
        "$queue": "claude",
        "$__rate_interval": "2m",
        "$__range": "10m",
    }
    without_data = []
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unknown variable in {expr}"
            values = [float(s["value"][1]) for s in prometheus.query(expr)]
            checked += 1
            if not values or all(math.isnan(v) for v in values):
                without_data.append(f"{panel['title']}: {expr}")
    assert checked >= 20
    assert without_data == []


def test_dashboard_datasource_is_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = {
        json.dumps(panel.get("datasource"), sort_keys=True)
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }
    assert datasources == {'{"type": "prometheus", "uid": "${datasource}"}'}
    variables = {v["name"]: v["type"] for v in dashboard["templating"]["list"]}
    assert variables["datasource"] == "datasource"


def test_rules_evaluate_on_live_data(prometheus, workload):
    wait_for(
        lambda: prometheus.value("queue:ksi_claude_run_seconds:p95_5m") is not None,
        15,
        "the recording rule queue:ksi_claude_run_seconds:p95_5m gave no data",
    )
    rules = [
        rule
        for group in prometheus.api("/api/v1/rules")["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) == 17
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def test_dead_letter_alert_pending_on_live_data(prometheus, workload):
    wait_for(
        lambda: any(
            alert["labels"]["alertname"] == "KsiDeadLetters"
            for alert in prometheus.api("/api/v1/alerts")["alerts"]
        ),
        15,
        "KsiDeadLetters is not pending while a dead letter is queued",
    )


def test_unknown_command_is_not_a_label(metrics_bundle, workload):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(metrics_bundle.home / "run" / "ksi.sock"))
        sock.sendall(b'{"command": "NO_SUCH_COMMAND_42"}\n')
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["error"]["code"] == "UNKNOWN_COMMAND"
    assert "NO_SUCH_COMMAND_42" not in scrape(metrics_bundle)
    unknown = exposed(
        metrics_bundle,
        "ksi_daemon_commands_total",
        command="unknown",
        result="UNKNOWN_COMMAND",
    )
    assert unknown == 1


def test_retry_counted_while_delayed(metrics_bundle, prometheus, workload):
    before = prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})')
    with metrics_bundle.client() as client:
        task_id = client.request(
            "QUEUE_TASK",
            prompt="retried once [stub:status=529,times=1,key=metrics-retry]",
            retry_min_backoff_s=4,
            retry_max_backoff_s=4,
        )["task_id"]
    wait_for(
        lambda: exposed(metrics_bundle, "ksi_queue_messages", state="delayed") == 1,
        60,
        "the retry was not counted as a delayed message",
    )
    waited = metrics_bundle.ksi("wait", "--timeout", "90", task_id)
    assert waited.returncode == 0, waited.stderr + metrics_bundle.logs_tail()

    wait_for(
        lambda: (
            prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})') == before + 1
        ),
        30,
        "Prometheus did not count the retried task",
    )
    assert prometheus.value("sum(ksi_task_retries_total)") == 1
    retried_runs = 'sum(ksi_claude_run_seconds_count{outcome="retried"})'
    assert prometheus.value(retried_runs) == 1
    assert prometheus.value('sum(ksi_queue_messages{state="delayed"})') == 0


def test_worker_restart_keeps_counters(metrics_bundle, prometheus, workload):
    before = prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})')
    old_child = worker_child(metrics_bundle, "ksi:worker_00")
    folder = metrics_bundle.home / "prometheus"
    assert (folder / f"counter_{old_child.pid}.db").exists()

    restarted = metrics_bundle.ctl("restart", "ksi:worker_00")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    metrics_bundle.wait_running()
    done = metrics_bundle.ksi("submit", "--wait", "after the restart")
    assert done.returncode == 0, done.stderr

    wait_for(
        lambda: (
            prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})') == before + 1
        ),
        30,
        "Prometheus did not count the task run after the restart",
    )
    assert counter_resets(prometheus) == {}
    assert (folder / f"counter_{old_child.pid}.db").exists()
    assert not (folder / f"gauge_livesum_{old_child.pid}.db").exists()


def test_sigkilled_worker_leaves_no_stale_gauge(metrics_bundle, prometheus, workload):
    before = prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})')
    folder = metrics_bundle.home / "prometheus"
    task_id = submit(metrics_bundle, "killed mid-task [stub:slow=6]")
    wait_for(
        lambda: record(metrics_bundle, task_id)["status"] == "running",
        30,
        "the slow task did not start",
    )
    pid = record(metrics_bundle, task_id)["worker_pid"]
    wait_for(
        lambda: prometheus.value("sum(ksi_tasks_in_progress)") == 1,
        15,
        "Prometheus did not see the slow task in progress",
    )
    assert (folder / f"gauge_livesum_{pid}.db").exists()

    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: not (folder / f"gauge_livesum_{pid}.db").exists(),
        15,
        f"the live gauge file of the killed worker pid {pid} was not removed",
    )
    wait_for(
        lambda: prometheus.value("sum(ksi_tasks_in_progress)") == 0,
        15,
        "the in-progress gauge of the killed worker was still exported",
    )

    # The broker hands the message to a worker again and the task succeeds.
    waited = metrics_bundle.ksi("wait", "--timeout", "90", task_id)
    kill_task_processes(task_id)
    assert waited.returncode == 0, waited.stderr + metrics_bundle.logs_tail()
    metrics_bundle.wait_running()
    wait_for(
        lambda: (
            prometheus.value('sum(ksi_tasks_total{outcome="succeeded"})') == before + 1
        ),
        30,
        "Prometheus did not count the redelivered task",
    )
    assert counter_resets(prometheus) == {}
    assert (folder / f"counter_{pid}.db").exists()
