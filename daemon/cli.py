"""``ksi``: the command-line client of the daemon.

Exit codes: 0 success, 1 the task failed, 2 invalid usage, 3 the daemon is
unreachable, 4 the task timed out, 5 the task was cancelled, 6 the daemon
rejected the request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NoReturn

import click

from ksi_worker.settings import Settings

from .client import CommandError, DaemonClient, DaemonUnavailable

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMED_OUT = 4
EXIT_CANCELLED = 5
EXIT_REJECTED = 6

EXIT_BY_STATUS = {
    "succeeded": EXIT_OK,
    "failed": EXIT_TASK_FAILED,
    "timed_out": EXIT_TIMED_OUT,
    "cancelled": EXIT_CANCELLED,
}

#: Seconds between two status polls of ``--wait``.
WAIT_POLL_S = 0.25


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ksi: {message}", err=True)
    sys.exit(code)


def _connect() -> DaemonClient:
    settings = Settings.from_env()
    try:
        return DaemonClient(settings.daemon_socket)
    except DaemonUnavailable as error:
        _fail(
            f"{error}.\nStart the bundle with `ksi-supervisord` and check it with "
            f"`ksi-supervisorctl status` (KSI_HOME={settings.home}).",
            EXIT_UNREACHABLE,
        )


def _request(client: DaemonClient, command: str, **params: Any) -> dict[str, Any]:
    try:
        return client.request(command, **params)
    except CommandError as error:
        _fail(f"{command} rejected: {error.code}: {error.message}", EXIT_REJECTED)
    except DaemonUnavailable as error:
        _fail(str(error), EXIT_UNREACHABLE)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _wait(client: DaemonClient, task_id: str, timeout_s: float | None) -> dict:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        record = _request(client, "TASK_STATUS", task_id=task_id)
        if record["status"] in EXIT_BY_STATUS:
            return record
        if deadline is not None and time.monotonic() > deadline:
            _fail(
                f"task {task_id} is still {record['status']} after {timeout_s:g} s",
                EXIT_TIMED_OUT,
            )
        time.sleep(WAIT_POLL_S)


def _report(record: dict[str, Any], as_json: bool) -> NoReturn:
    status = record["status"]
    if as_json:
        _print_json(record)
    elif status == "succeeded":
        click.echo(record.get("result") or "")
    else:
        click.echo(
            f"task {record['task_id']} {status}: {record.get('error') or ''}", err=True
        )
    sys.exit(EXIT_BY_STATUS.get(status, EXIT_TASK_FAILED))


@click.group()
def main() -> None:
    """Queue Claude Code tasks on the KSI bundle and watch them."""


@main.command()
@click.argument("prompt")
@click.option(
    "--wait", is_flag=True, help="Wait for the task to end and print its answer."
)
@click.option("--model", help="Claude model of this task (default: KSI_MODEL).")
@click.option(
    "--timeout",
    type=float,
    help="Time limit of the task in seconds (default: KSI_TASK_TIMEOUT_S).",
)
@click.option(
    "--allowed-tools",
    help="Comma-separated tools Claude may use without asking, e.g. Bash,Read.",
)
@click.option("--resume", "session_id", help="Claude session id to continue.")
@click.option("--max-retries", type=int, help="Retries after a retryable failure.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def submit(
    prompt: str,
    wait: bool,
    model: str | None,
    timeout: float | None,
    allowed_tools: str | None,
    session_id: str | None,
    max_retries: int | None,
    as_json: bool,
) -> None:
    """Queue PROMPT as a Claude task ('-' reads the prompt from stdin)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    params: dict[str, Any] = {"prompt": prompt}
    if model:
        params["model"] = model
    if timeout is not None:
        params["timeout_s"] = timeout
    if allowed_tools:
        params["allowed_tools"] = [
            t.strip() for t in allowed_tools.split(",") if t.strip()
        ]
    if session_id:
        params["session_id"] = session_id
    if max_retries is not None:
        params["max_retries"] = max_retries
    with _connect() as client:
        queued = _request(client, "QUEUE_TASK", **params)
        if not wait:
            if as_json:
                _print_json(queued)
            else:
                click.echo(queued["task_id"])
            return
        _report(_wait(client, queued["task_id"], None), as_json)


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
def status(task_id: str, as_json: bool) -> None:
    """Show the state of task TASK_ID."""
    with _connect() as client:
        record = _request(client, "TASK_STATUS", task_id=task_id)
    if as_json:
        _print_json(record)
        return
    for name in ("task_id", "status", "attempt", "elapsed_s", "cost_usd", "error"):
        if record.get(name) is not None:
            click.echo(f"{name}: {record[name]}")


@main.command()
@click.argument("task_id")
@click.option("--timeout", type=float, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the final record as JSON.")
def wait(task_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for task TASK_ID to end and print its answer."""
    with _connect() as client:
        _report(_wait(client, task_id, timeout), as_json)


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel task TASK_ID, killing its processes if it runs."""
    with _connect() as client:
        reply = _request(client, "CANCEL_TASK", task_id=task_id)
    if as_json:
        _print_json(reply)
    else:
        click.echo(f"task {reply['task_id']}: {reply['status']}")


@main.command(name="list")
@click.option("--status", "status_filter", help="Only tasks in this state.")
@click.option(
    "--limit", type=int, default=20, show_default=True, help="Most tasks shown."
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def list_tasks(status_filter: str | None, limit: int, as_json: bool) -> None:
    """List tasks, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status_filter:
        params["status"] = status_filter
    with _connect() as client:
        tasks = _request(client, "LIST_TASKS", **params)["tasks"]
    if as_json:
        _print_json(tasks)
        return
    for record in tasks:
        attempt = record.get("attempt", 0)
        click.echo(f"{record['task_id']}  {record['status']:<10}  attempt {attempt}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def health(as_json: bool) -> None:
    """Check Redis, the workers and the queue."""
    with _connect() as client:
        report = _request(client, "HEALTH_CHECK")
    if as_json:
        _print_json(report)
    else:
        click.echo(f"status: {report['status']}")
        for problem in report.get("problems", []):
            click.echo(f"problem: {problem}")
        if "live_workers" in report:
            click.echo(f"live workers: {report['live_workers']}")
            for queue, depth in report["queues"].items():
                click.echo(
                    f"queue {queue}: {depth['ready']} ready, {depth['delayed']} "
                    f"delayed, {depth['dead']} dead"
                )
    sys.exit(EXIT_OK if report["status"] == "ok" else EXIT_TASK_FAILED)
