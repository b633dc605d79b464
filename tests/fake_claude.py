#!/usr/bin/env python3
"""Fast fake of the Claude Code CLI in print mode, for unit tests and benchmarks.

It accepts the argv that KSI passes to ``claude --print``, reads the prompt from
stdin, and prints output shaped like Claude Code 2.1.197. The ``[stub:...]``
prompt markers of the ``stubapi`` stand-in select the outcome, with the same
marker grammar and reply text because both import it from ``stubapi.server``:

- no marker: success, result ``stub answer: <first line of the prompt>``.
- ``[stub:status=CODE]``: exit 1 with the error text the real CLI prints.
- ``[stub:status=CODE,times=K,key=NAME]``: fail the first K runs with key NAME,
  then reply normally. Runs are counted in files under the directory named by the
  FAKE_CLAUDE_STATE_DIR environment variable. Without it every run fails.
- ``[stub:slow=N]``: sleep N seconds, then reply normally.
- ``[stub:hang]``: sleep until killed.
- ``[stub:bash=COMMAND]``: run COMMAND with ``/bin/bash -c`` in the current
  directory and environment, then reply ``stub answer: bash done <output>``.

NOTE: The fake does not store sessions. ``--resume ID`` accepts any ID and reuses
it as the session ID, and the Bash command runs without a permission check.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stubapi.server import (  # noqa: E402
    ERROR_MESSAGES,
    MarkerError,
    Scenario,
    bash_reply_text,
    estimate_tokens,
    parse_markers,
    reply_text,
)

CLI_VERSION = "2.1.197"
# Model IDs that Claude Code 2.1.197 sends for its aliases.
MODEL_ALIASES = {
    "sonnet": "claude-sonnet-5",
    "opus": "claude-opus-4-8",
    "haiku": "claude-haiku-4-5-20251001",
}
DEFAULT_MODEL = "claude-sonnet-5"
# Estimate of the tokens in the system prompt and tool definitions that
# Claude Code 2.1.197 sends with every request (about 115 kB of JSON).
BASE_INPUT_TOKENS = 28_700
# Sonnet list prices in USD per token. Claude Code 2.1.197 computed
# total_cost_usd for claude-sonnet-5 with them.
INPUT_PRICE = 3e-6
OUTPUT_PRICE = 15e-6
# Part of the tool list that Claude Code 2.1.197 reports in its init line.
TOOL_NAMES = [
    "Task", "Bash", "Edit", "NotebookEdit", "Read", "Skill", "TaskOutput",
    "TaskStop", "WebFetch", "WebSearch", "Write",
]  # fmt: skip
HANG_SLEEP_SECONDS = 3600.0
STATE_DIR_VARIABLE = "FAKE_CLAUDE_STATE_DIR"


class CliUsageError(Exception):
    """Raised for argv that the real CLI rejects before it sends a request."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliUsageError(f"error: {message}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="claude", add_help=False)
    parser.add_argument("prompt", nargs="?")
    parser.add_argument("-p", "--print", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--output-format", choices=["text", "json", "stream-json"], default="text"
    )
    parser.add_argument("--input-format", choices=["text"], default="text")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("-r", "--resume", default=None)
    parser.add_argument("--session-id", default=None)
    parser.add_argument("--allowedTools", "--allowed-tools", nargs="+", default=[])
    parser.add_argument(
        "--disallowedTools", "--disallowed-tools", nargs="+", default=[]
    )
    parser.add_argument("--permission-mode", default="default")
    parser.add_argument("--dangerously-skip-permissions", action="store_true")
    parser.add_argument("--max-turns", type=int, default=None)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--append-system-prompt", default=None)
    parser.add_argument("--add-dir", nargs="+", default=[])
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise CliUsageError(f"error: unknown option '{unknown[0]}'")
    return namespace


class FakeRun:
    """One fake CLI run: its options, session and output lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = MODEL_ALIASES.get(args.model or "", args.model or DEFAULT_MODEL)
        self.session_id = args.resume or args.session_id or str(uuid.uuid4())
        self.started = time.monotonic()
        self.num_turns = 1
        self.input_tokens = 0
        self.output_tokens = 0

    # Output lines

    def emit(self, line: dict[str, Any]) -> None:
        if self.args.output_format == "stream-json":
            print(_to_json(line), flush=True)

    def emit_init(self) -> None:
        self.emit(
            {
                "type": "system",
                "subtype": "init",
                "cwd": os.getcwd(),
                "session_id": self.session_id,
                "tools": TOOL_NAMES,
                "mcp_servers": [],
                "model": self.model,
                "permissionMode": self.args.permission_mode,
                "slash_commands": [],
                "apiKeySource": "ANTHROPIC_API_KEY"
                if os.environ.get("ANTHROPIC_API_KEY")
                else "none",
                "claude_code_version": CLI_VERSION,
                "output_style": "default",
                "agents": [],
                "skills": [],
                "plugins": [],
                "analytics_disabled": True,
                "product_feedback_disabled": True,
                "uuid": str(uuid.uuid4()),
                "memory_paths": {},
                "fast_mode_state": "off",
            }
        )

    def emit_assistant(self, content: list[dict[str, Any]], input_tokens: int) -> None:
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": "msg_fake_" + uuid.uuid4().hex[:24],
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": content,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 1,
                        "service_tier": "standard",
                    },
                    "context_management": None,
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": str(uuid.uuid4()),
                "request_id": "req_fake_" + uuid.uuid4().hex[:24],
            }
        )

    def emit_tool_result(self, tool_use_id: str, output: str, is_error: bool) -> None:
        tool_use_result: str | dict[str, Any]
        if is_error:
            tool_use_result = f"Error: {output}"
        else:
            tool_use_result = {
                "stdout": output,
                "stderr": "",
                "interrupted": False,
                "isImage": False,
                "noOutputExpected": False,
            }
        self.emit(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "tool_use_id": tool_use_id,
                            "type": "tool_result",
                            "content": output,
                            "is_error": is_error,
                        }
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": str(uuid.uuid4()),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "tool_use_result": tool_use_result,
            }
        )

    def emit_error_assistant(self, text: str, error: str) -> None:
        # The real CLI reports an API error as a "<synthetic>" assistant message.
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": str(uuid.uuid4()),
                    "container": None,
                    "model": "<synthetic>",
                    "role": "assistant",
                    "stop_details": None,
                    "stop_reason": "stop_sequence",
                    "stop_sequence": "",
                    "type": "message",
                    "usage": _synthetic_usage(),
                    "content": [{"type": "text", "text": text}],
                    "context_management": None,
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": str(uuid.uuid4()),
                "error": error,
            }
        )

    def result_usage(self) -> dict[str, Any]:
        """Return the summed usage of the run, in the real CLI's key order."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": self.output_tokens,
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
            "service_tier": "standard",
            "cache_creation": {
                "ephemeral_1h_input_tokens": 0,
                "ephemeral_5m_input_tokens": 0,
            },
            "inference_geo": "",
            "iterations": [],
            "speed": "standard",
        }

    def result_line(
        self, text: str, is_error: bool, api_error_status: int | None
    ) -> dict[str, Any]:
        """Return the final ``result`` line with the key order of the real CLI."""
        duration_ms = int((time.monotonic() - self.started) * 1000)
        line: dict[str, Any] = {
            "type": "result",
            "subtype": "success",
            "is_error": is_error,
            "api_error_status": api_error_status,
            "duration_ms": duration_ms,
            "duration_api_ms": 0 if is_error else duration_ms,
        }
        if not is_error:
            # The real CLI adds these timing keys only when a response arrived.
            line["ttft_ms"] = duration_ms
            line["ttft_stream_ms"] = duration_ms
            line["time_to_request_ms"] = 0

        cost = self.input_tokens * INPUT_PRICE + self.output_tokens * OUTPUT_PRICE
        # The real CLI prints an integer 0 when nothing was spent.
        total_cost: float = cost if cost else 0
        model_usage: dict[str, Any] = {}
        if not is_error:
            model_usage[self.model] = {
                "inputTokens": self.input_tokens,
                "outputTokens": self.output_tokens,
                "cacheReadInputTokens": 0,
                "cacheCreationInputTokens": 0,
                "webSearchRequests": 0,
                "costUSD": cost,
                "contextWindow": 200000,
                "maxOutputTokens": 64000,
            }

        line.update(
            {
                "num_turns": self.num_turns,
                "result": text,
                "stop_reason": "stop_sequence" if is_error else "end_turn",
                "session_id": self.session_id,
                "total_cost_usd": total_cost,
                "usage": self.result_usage(),
                "modelUsage": model_usage,
                "permission_denials": [],
                "terminal_reason": "completed",
                "fast_mode_state": "off",
                "uuid": str(uuid.uuid4()),
            }
        )
        return line

    def finish(self, text: str, is_error: bool, api_error_status: int | None) -> int:
        """Print the result in the requested format and return the exit code."""
        line = self.result_line(text, is_error, api_error_status)
        if self.args.output_format == "text":
            print(text, flush=True)
        else:
            print(_to_json(line), flush=True)
        return 1 if is_error else 0

    # Scenarios

    def run(self, prompt: str, scenario: Scenario) -> int:
        self.emit_init()
        if scenario.hang:
            while True:
                time.sleep(HANG_SLEEP_SECONDS)
        if scenario.slow_seconds:
            time.sleep(scenario.slow_seconds)
        if scenario.status is not None and should_fail(scenario):
            text, error = api_error_text(scenario.status, self.model)
            self.emit_error_assistant(text, error)
            return self.finish(text, is_error=True, api_error_status=scenario.status)
        if scenario.bash_command is not None:
            return self.run_bash(prompt, scenario.bash_command)
        return self.reply(reply_text(prompt), prompt)

    def reply(self, text: str, prompt: str) -> int:
        input_tokens = BASE_INPUT_TOKENS + estimate_tokens(prompt)
        self.input_tokens += input_tokens
        self.output_tokens += estimate_tokens(text)
        self.emit_assistant([{"type": "text", "text": text}], input_tokens)
        return self.finish(text, is_error=False, api_error_status=None)

    def run_bash(self, prompt: str, command: str) -> int:
        tool_use_id = "toolu_fake_" + uuid.uuid4().hex[:24]
        tool_input = {"command": command, "description": "run"}
        input_tokens = BASE_INPUT_TOKENS + estimate_tokens(prompt)
        self.input_tokens += input_tokens
        self.output_tokens += estimate_tokens(json.dumps(tool_input))
        self.emit_assistant(
            [
                {
                    "type": "tool_use",
                    "id": tool_use_id,
                    "name": "Bash",
                    "input": tool_input,
                }
            ],
            input_tokens,
        )
        output, is_error = run_bash_command(command)
        self.emit_tool_result(tool_use_id, output, is_error)
        self.num_turns = 2
        return self.reply(bash_reply_text(output, is_error), prompt + output)


def should_fail(scenario: Scenario) -> bool:
    """Count this run for the scenario's key and return whether it must fail."""
    state_dir = os.environ.get(STATE_DIR_VARIABLE)
    if scenario.times is None or scenario.key is None or not state_dir:
        return True
    # Hash the key so that any key text makes a valid file name.
    digest = hashlib.sha256(scenario.key.encode()).hexdigest()
    path = Path(state_dir) / f"fake-claude-key-{digest}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        # The lock makes read-increment-write atomic across concurrent runs.
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        count = int(handle.read().strip() or "0") + 1
        handle.seek(0)
        handle.truncate()
        handle.write(str(count))
    return count <= scenario.times


def run_bash_command(command: str) -> tuple[str, bool]:
    """Run command and return its output and error flag as the Bash tool sends them.

    Like the Bash tool of Claude Code 2.1.197, stderr is merged into stdout and a
    failed command's output starts with an ``Exit code N`` line.
    """
    completed = subprocess.run(
        ["/bin/bash", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        check=False,
    )
    output = completed.stdout.rstrip("\n")
    if completed.returncode != 0:
        output = f"Exit code {completed.returncode}\n{output}".rstrip("\n")
    return output, completed.returncode != 0


def api_error_text(status: int, model: str) -> tuple[str, str]:
    """Return the result text and error kind that Claude Code 2.1.197 prints.

    The texts are for an API key in ANTHROPIC_API_KEY, and the message part is
    the one that the stubapi stand-in sends for the status.
    """
    message = ERROR_MESSAGES.get(status, f"Stub error {status}.")
    if status == 401:
        return "Invalid API key · Fix external API key", "authentication_failed"
    if status == 403:
        return f"Failed to authenticate. API Error: 403 {message}", (
            "authentication_failed"
        )
    if status == 404:
        return (
            f"There's an issue with the selected model ({model}). It may not exist "
            "or you may not have access to it. Run --model to pick a different "
            "model.",
            "model_not_found",
        )
    if status == 429:
        return f"API Error: Request rejected (429) · {message}", "rate_limit"
    if status >= 500:
        return (
            f"API Error: {status} {message.rstrip('.!?…')}. This is a server-side "
            "issue, usually temporary — try again in a moment."
            f"{_server_error_hint()}",
            "server_error",
        )
    return f"API Error: {status} {message}", "unknown"


def _server_error_hint() -> str:
    # NOTE: Only the gateway branch was run. The status page branch for an
    # unset ANTHROPIC_BASE_URL is read from the Claude Code 2.1.197 bundle.
    base_url = os.environ.get("ANTHROPIC_BASE_URL", "")
    if not base_url:
        return " If it persists, check https://status.claude.com."
    host = urlsplit(base_url).netloc or base_url
    return f" If it persists, check your inference gateway ({host})."


def _to_json(line: dict[str, Any]) -> str:
    # Compact separators and raw non-ASCII text, as the real CLI prints.
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def _synthetic_usage() -> dict[str, Any]:
    return {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "service_tier": None,
        "cache_creation": {
            "ephemeral_1h_input_tokens": 0,
            "ephemeral_5m_input_tokens": 0,
        },
        "inference_geo": None,
        "iterations": None,
        "speed": None,
    }


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except CliUsageError as error:
        print(error, file=sys.stderr)
        return 1
    if not args.print:
        print("Error: the fake claude supports only --print mode.", file=sys.stderr)
        return 1
    if args.output_format == "stream-json" and not args.verbose:
        print(
            "Error: When using --print, --output-format=stream-json requires --verbose",
            file=sys.stderr,
        )
        return 1
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print(
            "Error: Input must be provided either through stdin or as a prompt "
            "argument when using --print",
            file=sys.stderr,
        )
        return 1
    try:
        scenario = parse_markers(prompt)
    except MarkerError as error:
        # The stand-in rejects such a prompt with HTTP 400, so the CLI fails too.
        run = FakeRun(args)
        text = f"API Error: 400 {error}"
        run.emit_init()
        run.emit_error_assistant(text, "unknown")
        return run.finish(text, is_error=True, api_error_status=400)
    return FakeRun(args).run(prompt, scenario)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
