"""Decide a task's outcome from what the Claude CLI printed and how it exited.

The CLI's closing JSON line (``"type": "result"``) decides: exit code 0 with
``is_error`` false is success. Anything else is a failure, classified as
retryable or not from the HTTP status when the CLI reports one
(``api_error_status``) and from the error text otherwise, because the CLI
leaves the status null for a request timeout, a missing key and repeated
overload (checked with CLI 2.1.197).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from typing import Any

#: HTTP statuses worth retrying: timeout, conflict, rate limit, server
#: errors and Anthropic's 529 overload.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

#: Error texts of the CLI, checked in order, with their class and whether a
#: retry may help. Used when the CLI reports no HTTP status.
TEXT_CLASSES: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (
        re.compile(r"No conversation found with session ID", re.I),
        "session_not_found",
        False,
    ),
    (
        re.compile(r"Not logged in|Invalid API key|/login", re.I),
        "authentication",
        False,
    ),
    (re.compile(r"Request timed out|timed out", re.I), "api_timeout", True),
    (re.compile(r"Overloaded|\b529\b", re.I), "overloaded", True),
    (re.compile(r"rate.?limit|\b429\b", re.I), "rate_limited", True),
    (
        re.compile(
            r"Connection error|ECONNREFUSED|ECONNRESET|ENOTFOUND|EAI_AGAIN|"
            r"socket hang up|fetch failed|network",
            re.I,
        ),
        "network",
        True,
    ),
)


@dataclass
class Outcome:
    """The decision about one CLI run.

    ``error_class`` is None on success. ``retryable`` tells whether running the
    task again may succeed.
    """

    succeeded: bool
    retryable: bool = False
    error_class: str | None = None
    http_status: int | None = None
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def find_result_line(stdout: bytes) -> dict[str, Any] | None:
    """Return the CLI's closing ``result`` object, or None if there is none.

    Works for ``--output-format json`` (one line) and ``stream-json`` (one
    object a line, the result last).
    """
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("type") == "result":
            return value
    return None


def classify_status(status: int) -> tuple[str, bool]:
    if status == 429:
        return "rate_limited", True
    if status == 529:
        return "overloaded", True
    if status in (401,):
        return "authentication", False
    if status == 403:
        return "permission", False
    if status in RETRYABLE_STATUSES:
        return ("server_error" if status >= 500 else "api_transient"), True
    if 400 <= status < 500:
        return "invalid_request", False
    return "api_error", status >= 500


def classify_text(text: str) -> tuple[str, bool]:
    for pattern, error_class, retryable in TEXT_CLASSES:
        if pattern.search(text):
            return error_class, retryable
    return "cli_error", False


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def decide(*, returncode: int | None, stdout: bytes, stderr_tail: str) -> Outcome:
    """Classify a CLI run that ended on its own (not stopped by the runner)."""
    result = find_result_line(stdout)
    if result is None:
        stderr = _tail(stderr_tail)
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            return Outcome(
                succeeded=False,
                retryable=True,
                error_class="killed",
                message=f"claude was killed by {name}, not by KSI; stderr: {stderr}",
            )
        return Outcome(
            succeeded=False,
            retryable=False,
            error_class="bad_output",
            message=(
                f"claude exited with code {returncode} without its JSON result "
                f"line; stderr: {stderr or '(empty)'}"
            ),
        )

    if returncode == 0 and not result.get("is_error"):
        return Outcome(succeeded=True, result=result)

    text = str(result.get("result") or "")
    status = result.get("api_error_status")
    if isinstance(status, int):
        error_class, retryable = classify_status(status)
        # "No conversation found" comes with no status today, but a future
        # CLI may attach one; the text is the more specific signal.
        if classify_text(text)[0] == "session_not_found":
            error_class, retryable = "session_not_found", False
    else:
        status = None
        error_class, retryable = classify_text(text + "\n" + stderr_tail)
    parts = [error_class]
    if status is not None:
        parts.append(f"HTTP {status}")
    message = f"{' '.join(parts)}: {text.strip() or '(no message)'}"
    stderr = _tail(stderr_tail)
    if stderr:
        message += f"; stderr: {stderr}"
    return Outcome(
        succeeded=False,
        retryable=retryable,
        error_class=error_class,
        http_status=status,
        message=message,
        result=result,
    )
