"""``ksi``: the command-line client of the daemon.

Exit codes:

- 0 success, 1 the task failed, 2 invalid usage, 3 the daemon is unreachable;
- 4 the task timed out, 5 the task was cancelled, 6 the daemon rejected the
  request;
- 7 ``--timeout`` of ``wait`` ran out while the task goes on, 8 ``health``
  found the bundle unhealthy;
- 130 Ctrl-C interrupted the wait, and the task goes on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.live import Live

from ksi_worker.settings import Settings, SettingsError

from .client import CommandError, DaemonClient, DaemonUnavailable
from .display import (
    TaskView,
    event_line,
    event_text,
    queue_lines,
    queues_table,
    tasks_table,
)
from .follow import EventFollower, wait_for_task
from .protocol import MAX_PROMPT_BYTES

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMED_OUT = 4
EXIT_CANCELLED = 5
EXIT_REJECTED = 6
EXIT_WAIT_TIMEOUT = 7
EXIT_UNHEALTHY = 8
EXIT_INTERRUPTED = 130

#: Seconds ``ksi`` keeps trying a missing daemon socket, so a command right
#: after ``ksi-supervisord`` finds the daemon once it has started.
CONNECT_WAIT_S = 5.0

EXIT_BY_STATUS = {
    "succeeded": EXIT_OK,
    "failed": EXIT_TASK_FAILED,
    "timed_out": EXIT_TIMED_OUT,
    "cancelled": EXIT_CANCELLED,
}


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ksi: {message}", err=True)
    sys.exit(code)


def _fail_unreachable(error: Exception) -> NoReturn:
    _fail(
        f"{error}.\nStart the bundle with `ksi-supervisord` and check it with "
        f"`ksi-supervisorctl status` (KSI_HOME={Settings.from_env().home}).",
        EXIT_UNREACHABLE,
    )


def _connect() -> DaemonClient:
    settings = Settings.from_env()
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            return DaemonClient(settings.daemon_socket)
        except DaemonUnavailable as error:
            if time.monotonic() >= deadline:
                _fail_unreachable(error)
            time.sleep(0.2)


def _request(client: DaemonClient, command: str, **params: Any) -> dict[str, Any]:
    try:
        return client.request(command, **params)
    except CommandError as error:
        _fail(f"{command} rejected: {error.code}: {error.message}", EXIT_REJECTED)
    except DaemonUnavailable as error:
        _fail(str(error), EXIT_UNREACHABLE)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _wait(
    task_id: str,
    timeout_s: float | None,
    *,
    since: str | None = None,
    live: bool = False,
) -> dict[str, Any]:
    """Wait for a task's end through SUBSCRIBE; show its progress when live."""
    socket_path = Settings.from_env().daemon_socket
    try:
        if not live:
            return wait_for_task(socket_path, task_id, timeout_s=timeout_s, since=since)
        view = TaskView(task_id)
        if since is None:
            with _connect() as client:
                record = _request(client, "TASK_STATUS", task_id=task_id)
            view.status, view.attempt = record["status"], record.get("attempt", 0)
        with Live(get_renderable=view.render, refresh_per_second=4):
            return wait_for_task(
                socket_path,
                task_id,
                timeout_s=timeout_s,
                since=since,
                on_event=view.update,
            )
    except TimeoutError:
        _fail(
            f"task {task_id} did not end within {timeout_s:g} s; it goes on",
            EXIT_WAIT_TIMEOUT,
        )
    except KeyboardInterrupt:
        _fail(
            f"interrupted; task {task_id} goes on (`ksi wait {task_id}` to follow "
            f"it again, `ksi cancel {task_id}` to end it)",
            EXIT_INTERRUPTED,
        )
    except CommandError as error:
        _fail(
            f"waiting for task {task_id}: {error.code}: {error.message}", EXIT_REJECTED
        )
    except DaemonUnavailable as error:
        _fail_unreachable(error)


def _stream_position(client: DaemonClient) -> str | None:
    """Return the id of the newest event, or None if the daemon has no EVENTS_INFO."""
    try:
        return client.request("EVENTS_INFO")["last_id"]
    except CommandError:
        return None


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _report(record: dict[str, Any], as_json: bool) -> NoReturn:
    status = record["status"]
    if as_json:
        _print_json(record)
    elif status == "succeeded":
        click.echo(record.get("result") or "")
    else:
        reason = record.get("error") or "no error recorded"
        click.echo(f"task {record['task_id']} ended {status}: {reason}", err=True)
    sys.exit(EXIT_BY_STATUS.get(status, EXIT_TASK_FAILED))


@click.group()
def main() -> None:
    """Queue Claude Code tasks on the KSI bundle and watch them."""


@main.command()
@click.argument("prompt")
@click.option(
    "--wait", is_flag=True, help="Wait for the task to end and print its result."
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
@click.option(
    "--max-retries",
    type=int,
    help="Retries after a retryable failure (default: KSI_MAX_RETRIES, 3).",
)
@click.option("--retry-on-timeout", is_flag=True, help="Retry after a timeout.")
@click.option("--agent", "agent_id", help="Agent id, for the per-agent start limit.")
@click.option(
    "--idempotency-key",
    help="Queue at most one task per key within 24 h; repeats return its id.",
)
@click.option(
    "--idle-timeout",
    type=float,
    help="Seconds without output from Claude after which the task ends timed_out "
    "(default: KSI_IDLE_TIMEOUT_S).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def submit(
    prompt: str,
    wait: bool,
    model: str | None,
    timeout: float | None,
    idle_timeout: float | None,
    allowed_tools: str | None,
    session_id: str | None,
    max_retries: int | None,
    retry_on_timeout: bool,
    agent_id: str | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Queue PROMPT as a Claude task ('-' reads the prompt from stdin)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        _fail(
            f"the prompt is {size} bytes, above the limit of {MAX_PROMPT_BYTES} "
            "bytes; shorten it or put the material in files the task can read",
            EXIT_REJECTED,
        )
    params: dict[str, Any] = {"prompt": prompt}
    if model is not None:
        params["model"] = model
    if timeout is not None:
        params["timeout_s"] = timeout
    if idle_timeout is not None:
        params["idle_timeout_s"] = idle_timeout
    if allowed_tools:
        params["allowed_tools"] = [
            t.strip() for t in allowed_tools.split(",") if t.strip()
        ]
    if session_id:
        params["session_id"] = session_id
    if max_retries is not None:
        params["max_retries"] = max_retries
    if retry_on_timeout:
        params["retry_on_timeout"] = True
    if agent_id:
        params["agent_id"] = agent_id
    if idempotency_key:
        params["idempotency_key"] = idempotency_key
    with _connect() as client:
        # Read before queueing, so the replay starts before TASK_QUEUED.
        since = _stream_position(client) if wait else None
        queued = _request(client, "QUEUE_TASK", **params)
    if not wait:
        if as_json:
            _print_json(queued)
        else:
            click.echo(queued["task_id"])
        return
    live = not as_json and _is_terminal()
    _report(_wait(queued["task_id"], None, since=since, live=live), as_json)


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
    """Wait for task TASK_ID to end and print its result."""
    live = not as_json and _is_terminal()
    _report(_wait(task_id, timeout, live=live), as_json)


def _task_command(command: str, task_id: str, as_json: bool) -> None:
    """Send a command about one task and print the task's new status."""
    with _connect() as client:
        reply = _request(client, command, task_id=task_id)
    if as_json:
        _print_json(reply)
    else:
        click.echo(f"task {reply['task_id']}: {reply['status']}")


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel task TASK_ID, killing its processes if it runs."""
    _task_command("CANCEL_TASK", task_id, as_json)


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
    if _is_terminal():
        Console().print(tasks_table(tasks))
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
    sys.exit(EXIT_OK if report["status"] == "ok" else EXIT_UNHEALTHY)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the depths as JSON.")
def queues(as_json: bool) -> None:
    """Show how many messages each queue contains per state."""
    with _connect() as client:
        report = _request(client, "HEALTH_CHECK")
    if "queues" not in report:
        _fail(
            "; ".join(report.get("problems") or ["no queue depths"]), EXIT_TASK_FAILED
        )
    if as_json:
        _print_json(report["queues"])
    elif _is_terminal():
        Console().print(queues_table(report["queues"]))
    else:
        for line in queue_lines(report["queues"]):
            click.echo(line)


@main.command()
@click.option(
    "--type",
    "event_types",
    multiple=True,
    help="Only events of this type, such as TASK_FAILED; repeat for more types.",
)
@click.option("--task", "task_id", help="Only events of this task.")
@click.option(
    "--since",
    help="First replay the events after this stream id ('0': every stored event).",
)
@click.option("--count", type=int, help="Exit after this many events.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print each event as a JSON line."
)
def watch(
    event_types: tuple[str, ...],
    task_id: str | None,
    since: str | None,
    count: int | None,
    as_json: bool,
) -> None:
    """Follow the event stream until interrupted, across daemon restarts."""
    follower = EventFollower(
        Settings.from_env().daemon_socket,
        event_types=list(event_types) or None,
        task_id=task_id,
        since=since,
    )
    console = Console() if _is_terminal() and not as_json else None
    shown = 0
    try:
        for event in follower:
            if as_json:
                click.echo(json.dumps(event, separators=(",", ":")))
            elif console is not None:
                console.print(event_text(event))
            else:
                click.echo(event_line(event))
            shown += 1
            if count is not None and shown >= count:
                break
    except KeyboardInterrupt:
        pass
    except CommandError as error:
        _fail(f"SUBSCRIBE rejected: {error.code}: {error.message}", EXIT_REJECTED)
    except DaemonUnavailable as error:
        _fail_unreachable(error)
    if follower.trimmed:
        click.echo(
            f"ksi: some events after {since} may be missing: the stream was "
            "trimmed to its length cap (KSI_EVENTS_MAXLEN) since then",
            err=True,
        )


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def retry(task_id: str, as_json: bool) -> None:
    """Queue a failed, timed-out or cancelled task TASK_ID again."""
    _task_command("RETRY_TASK", task_id, as_json)


@main.group()
def dlq() -> None:
    """Inspect and replay dead-lettered tasks."""


@dlq.command(name="list")
@click.option(
    "--limit",
    type=int,
    default=100,
    show_default=True,
    help="Maximum number of dead letters listed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the dead letters as JSON.")
def dlq_list(limit: int, as_json: bool) -> None:
    """List dead-lettered tasks, newest first."""
    with _connect() as client:
        reply = _request(client, "LIST_DEAD_LETTERS", limit=limit)
    if as_json:
        _print_json(reply)
        return
    if not reply["dead_letters"]:
        click.echo(f"no dead letters in queue {reply['queue']}")
    for letter in reply["dead_letters"]:
        click.echo(
            f"{letter['task_id']}  attempt {letter.get('attempt')}  "
            f"{letter.get('error') or ''}"
        )


@dlq.command(name="retry")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def dlq_retry(task_id: str, as_json: bool) -> None:
    """Replay dead-lettered task TASK_ID; it keeps its id and history."""
    _task_command("RETRY_TASK", task_id, as_json)


@dlq.command(name="purge")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
def dlq_purge(as_json: bool) -> None:
    """Delete every dead letter; the task records stay failed."""
    with _connect() as client:
        reply = _request(client, "PURGE_DEAD_LETTERS")
    if as_json:
        _print_json(reply)
    else:
        click.echo(f"purged {reply['purged']} dead letters from queue {reply['queue']}")


@main.command()
@click.option(
    "--dry-run", is_flag=True, help="List what would be killed and why; kill nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def reap(dry_run: bool, as_json: bool) -> None:
    """Run one reaper pass: kill Claude processes that no live task owns.

    The pass runs in this process against KSI_REDIS_URL, so it finds only the
    processes whose environment this user may read.
    """
    # Imported here so that the other commands start without psutil and redis.
    from ksi_worker.reaper import Reaper, scan_report

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        _fail(f"invalid setting: {error}", EXIT_USAGE)
    # The reaper's warnings (Redis unreachable, each kill) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="ksi: %(message)s")
    reaper = Reaper.from_settings(settings)
    scan = reaper.scan()
    kills = None if dry_run else reaper.kill(scan.orphans)
    report = scan_report(scan, kills)
    if as_json:
        _print_json(report)
        return
    for orphan in report["orphans"]:
        click.echo(
            f"pid {orphan['pid']}  {orphan['name']}  task {orphan['task_id']} "
            f"attempt {orphan['attempt']}  {orphan['reason']}: {orphan['detail']}"
        )
    if not report["orphans"]:
        click.echo("no orphaned processes")
    if kills is not None:
        click.echo(f"killed {len(kills)} processes")
