"""Outcome and failure classes decided from the CLI's output."""

import json

import pytest

from ksi_worker.claude_result import decide, find_result_line


def _result_line(**fields) -> bytes:
    base = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "api_error_status": None,
        "result": "hello",
        "session_id": "s-1",
    }
    return json.dumps({**base, **fields}).encode() + b"\n"


def test_success_needs_exit_zero_and_no_error():
    outcome = decide(returncode=0, stdout=_result_line(), stderr_tail="")
    assert outcome.succeeded
    assert outcome.result["result"] == "hello"


def test_stream_json_takes_last_result_line():
    stdout = b'{"type":"system"}\n{"type":"assistant"}\n' + _result_line(result="x")
    assert find_result_line(stdout)["result"] == "x"


def test_is_error_with_exit_zero_is_failure():
    outcome = decide(returncode=0, stdout=_result_line(is_error=True), stderr_tail="")
    assert not outcome.succeeded


@pytest.mark.parametrize(
    ("status", "error_class", "retryable"),
    [
        (429, "rate_limited", True),
        (500, "server_error", True),
        (502, "server_error", True),
        (503, "server_error", True),
        (529, "overloaded", True),
        (408, "api_transient", True),
        (400, "invalid_request", False),
        (401, "authentication", False),
        (403, "permission", False),
        (404, "invalid_request", False),
    ],
)
def test_http_status_classes(status, error_class, retryable):
    stdout = _result_line(
        is_error=True, api_error_status=status, result=f"API Error: {status}"
    )
    outcome = decide(returncode=1, stdout=stdout, stderr_tail="")
    assert outcome.error_class == error_class
    assert outcome.retryable is retryable
    assert f"HTTP {status}" in outcome.message


@pytest.mark.parametrize(
    ("text", "error_class", "retryable"),
    [
        ("Not logged in · Please run /login", "authentication", False),
        ("Invalid API key · Please run /login", "authentication", False),
        ("Request timed out", "api_timeout", True),
        ("API Error: Repeated 529 Overloaded errors", "overloaded", True),
        ("API Error: Connection error.", "network", True),
        ("No conversation found with session ID: abc", "session_not_found", False),
        ("something nobody has seen", "cli_error", False),
    ],
)
def test_text_classes_without_status(text, error_class, retryable):
    outcome = decide(
        returncode=1, stdout=_result_line(is_error=True, result=text), stderr_tail=""
    )
    assert outcome.error_class == error_class
    assert outcome.retryable is retryable


def test_output_without_json_is_not_retryable():
    outcome = decide(returncode=1, stdout=b"oops\n", stderr_tail="usage: claude\n")
    assert outcome.error_class == "bad_output"
    assert not outcome.retryable
    assert "usage: claude" in outcome.message


def test_foreign_signal_is_retryable():
    outcome = decide(returncode=-9, stdout=b"", stderr_tail="")
    assert outcome.error_class == "killed"
    assert outcome.retryable
    assert "SIGKILL" in outcome.message


def test_error_message_carries_stderr_tail():
    stdout = _result_line(is_error=True, api_error_status=500, result="API Error: 500")
    outcome = decide(returncode=1, stdout=stdout, stderr_tail="a\nb\nlast line\n")
    assert "last line" in outcome.message
