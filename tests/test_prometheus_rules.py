"""The Prometheus configuration, rules and rule unit tests, checked by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ksi_worker.settings import PROJECT_ROOT

PROMETHEUS_DIR = PROJECT_ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing; run scripts/setup, which installs it")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _alert_blocks() -> dict[str, str]:
    """Return the text of each alert rule in rules.yml, keyed by alert name."""
    parts = re.split(r"^\s*- alert: ", RULES.read_text(), flags=re.MULTILINE)
    return {part.split()[0]: part for part in parts[1:]}


def test_promtool_check_config():
    checked = _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_check_rules():
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_rule_unit_tests_pass():
    tested = _promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_unit_test():
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert set(_alert_blocks()) - tested == set()


@pytest.mark.parametrize(
    "alert",
    [
        "KsiMetricsEndpointDown",
        "KsiRedisDown",
        "KsiNoLiveWorkers",
        "KsiQueueBacklogGrowing",
        "KsiQueueWaitTooLong",
        "KsiHighFailureRatio",
        "KsiDeadLetters",
        "KsiOrphansReaped",
    ],
)
def test_alert_has_summary_and_runbook(alert):
    block = _alert_blocks()[alert]
    assert re.search(r"^\s+summary: \S", block, flags=re.MULTILINE)
    assert re.search(r"^\s+runbook: \S", block, flags=re.MULTILINE)
    assert re.search(r"^\s+severity: (critical|warning)$", block, flags=re.MULTILINE)


def test_alert_list_is_complete():
    assert len(_alert_blocks()) == 8
