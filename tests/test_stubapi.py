"""Tests for the stubapi stand-in, the real Claude Code CLI against it, and the fake.

The tests that run the real CLI need its path in KSI_CLAUDE_BIN and are skipped
without it. The expected texts were recorded from Claude Code 2.1.197.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = REPO_ROOT / "tests" / "fake_claude.py"
STARTUP_TIMEOUT_SECONDS = 10.0
CLI_TIMEOUT_SECONDS = 60.0

# Keys of the json result line, in order, as Claude Code 2.1.197 prints them.
# A failed request has no timing keys because no response arrived.
SUCCESS_RESULT_KEYS = [
    "type",
    "subtype",
    "is_error",
    "api_error_status",
    "duration_ms",
    "duration_api_ms",
    "ttft_ms",
    "ttft_stream_ms",
    "time_to_request_ms",
    "num_turns",
    "result",
    "stop_reason",
    "session_id",
    "total_cost_usd",
    "usage",
    "modelUsage",
    "permission_denials",
    "terminal_reason",
    "fast_mode_state",
    "uuid",
]
TIMING_KEYS = {"ttft_ms", "ttft_stream_ms", "time_to_request_ms"}
ERROR_RESULT_KEYS = [key for key in SUCCESS_RESULT_KEYS if key not in TIMING_KEYS]
RATE_LIMIT_TEXT = (
    "API Error: Request rejected (429) · "
    "This request would exceed the rate limit for your organization (stub)."
)
INVALID_KEY_TEXT = "Invalid API key · Fix external API key"
SERVER_ERROR_TEMPLATE = (
    "API Error: {status} {message}. This is a server-side issue, usually "
    "temporary — try again in a moment. If it persists, check your inference "
    "gateway (127.0.0.1:{port})."
)


# Stand-in process


@dataclass
class StubProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """Send SIGTERM and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_stub(directory: Path) -> StubProcess:
    port_file = directory / "port"
    log_path = directory / "stubapi.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stubapi",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not port_file.exists():
        if process.poll() is not None:
            pytest.fail(
                f"stubapi exited with {process.returncode}: {log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"stubapi wrote no port file within {STARTUP_TIMEOUT_SECONDS} s"
            )
        time.sleep(0.02)
    return StubProcess(process, int(port_file.read_text()), log_path)


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StubProcess]:
    stub_process = start_stub(tmp_path_factory.mktemp("stubapi"))
    yield stub_process
    assert stub_process.stop() == 0


# HTTP helpers


def request(
    stub_process: StubProcess,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", stub_process.port, timeout=timeout
    )
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def messages_body(*messages: Any, stream: bool = True, tools: Any = None) -> dict:
    body: dict[str, Any] = {
        "model": "claude-sonnet-5",
        "max_tokens": 1024,
        "messages": list(messages),
        "stream": stream,
    }
    if tools is not None:
        body["tools"] = tools
    return body


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def parse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def stats(stub_process: StubProcess) -> dict[str, Any]:
    status, _, body = request(stub_process, "GET", "/_stub/stats")
    assert status == 200
    return json.loads(body)


BASH_TOOLS = [
    {
        "name": "Bash",
        "description": "Run a command.",
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "description": {"type": "string"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    }
]


# Stand-in over HTTP


def test_stub_streams_text_reply(stub: StubProcess) -> None:
    body = messages_body(user("[stub:slow=0.1] hello there\nsecond line"))
    status, headers, raw = request(stub, "POST", "/v1/messages?beta=true", body)

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["request-id"].startswith("req_")
    events = parse_events(raw)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert len(deltas) > 1
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == "stub answer: hello there"
    start_usage = events[0][1]["message"]["usage"]
    assert start_usage["input_tokens"] > 0
    assert start_usage["cache_read_input_tokens"] == 0
    assert start_usage["cache_creation_input_tokens"] == 0
    message_delta = events[-2][1]
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] > 0


def test_stub_non_streaming_reply(stub: StubProcess) -> None:
    body = messages_body(user("plain"), stream=False)
    status, _, raw = request(stub, "POST", "/v1/messages", body)

    assert status == 200
    message = json.loads(raw)
    assert message["content"] == [{"type": "text", "text": "stub answer: plain"}]
    assert message["stop_reason"] == "end_turn"


def test_stub_count_tokens(stub: StubProcess) -> None:
    status, _, raw = request(
        stub, "POST", "/v1/messages/count_tokens", messages_body(user("x"))
    )

    assert status == 200
    assert json.loads(raw)["input_tokens"] > 0


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_stub_status_error_body(stub: StubProcess, code: int, error_type: str) -> None:
    body = messages_body(user(f"[stub:status={code}] fail"))
    status, headers, raw = request(stub, "POST", "/v1/messages", body)

    assert status == code
    assert headers["request-id"].startswith("req_")
    error = json.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == error_type
    assert error["error"]["message"]


def test_stub_times_key_fails_then_replies(stub: StubProcess) -> None:
    key = uuid.uuid4().hex
    body = messages_body(user(f"[stub:status=503,times=2,key={key}] again"))

    codes = [request(stub, "POST", "/v1/messages", body)[0] for _ in range(3)]

    assert codes == [503, 503, 200]
    assert stats(stub)["keys"][key] == 3


def test_stub_marker_read_from_latest_prompt(stub: StubProcess) -> None:
    earlier = [user("[stub:status=500] first"), {"role": "assistant", "content": "ok"}]
    body = messages_body(*earlier, user("later prompt"))
    status, _, raw = request(stub, "POST", "/v1/messages", body)

    assert status == 200
    text = "".join(
        data["delta"]["text"]
        for name, data in parse_events(raw)
        if name == "content_block_delta"
    )
    assert text == "stub answer: later prompt"


def test_stub_skips_system_reminder_text(stub: StubProcess) -> None:
    prompt = {
        "role": "user",
        "content": [
            {
                "type": "text",
                "text": "<system-reminder>\ncontext\n</system-reminder>\n",
            },
            {"type": "text", "text": "real prompt\n"},
        ],
    }
    status, _, raw = request(
        stub, "POST", "/v1/messages", messages_body(prompt, stream=False)
    )

    assert status == 200
    assert json.loads(raw)["content"][0]["text"] == "stub answer: real prompt"


def test_stub_bash_tool_use_then_result(stub: StubProcess) -> None:
    prompt = user("[stub:bash=echo a, b=c && ls] go")
    body = messages_body(prompt, tools=BASH_TOOLS)
    status, _, raw = request(stub, "POST", "/v1/messages", body)

    assert status == 200
    events = parse_events(raw)
    block = events[2][1]["content_block"]
    assert block["type"] == "tool_use"
    assert block["name"] == "Bash"
    partial = "".join(
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta"
    )
    assert json.loads(partial) == {"command": "echo a, b=c && ls", "description": "run"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    tool_use = {
        "role": "assistant",
        "content": [dict(block, input=json.loads(partial))],
    }
    result = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": block["id"],
                "content": "a, b=c\nfile",
            }
        ],
    }
    body = messages_body(prompt, tool_use, result, stream=False, tools=BASH_TOOLS)
    status, _, raw = request(stub, "POST", "/v1/messages", body)

    assert status == 200
    message = json.loads(raw)
    assert message["content"][0]["text"] == "stub answer: bash done a, b=c file"
    assert message["stop_reason"] == "end_turn"


def test_stub_rejects_invalid_marker(stub: StubProcess) -> None:
    body = messages_body(user("[stub:status=abc] x"))
    status, _, raw = request(stub, "POST", "/v1/messages", body)

    assert status == 400
    assert "status" in json.loads(raw)["error"]["message"]


def test_stub_unknown_path_is_404(stub: StubProcess) -> None:
    status, _, raw = request(stub, "GET", "/v1/models")

    assert status == 404
    assert json.loads(raw)["error"]["type"] == "not_found_error"


def test_stub_stats_count_scenarios(stub: StubProcess) -> None:
    before = stats(stub)
    request(stub, "HEAD", "/")
    request(stub, "POST", "/v1/messages", messages_body(user("count me")))

    after = stats(stub)
    assert after["requests"] == before["requests"] + 2
    assert after["scenarios"]["head"] == before["scenarios"].get("head", 0) + 1
    assert after["scenarios"]["normal"] == before["scenarios"].get("normal", 0) + 1


def test_stub_hang_does_not_block_sigterm(tmp_path: Path) -> None:
    stub_process = start_stub(tmp_path)
    try:
        with socket.create_connection(
            ("127.0.0.1", stub_process.port), timeout=5
        ) as sock:
            payload = json.dumps(messages_body(user("[stub:hang]"))).encode()
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            deadline = time.monotonic() + 5
            while stats(stub_process)["scenarios"].get("hang", 0) == 0:
                assert time.monotonic() < deadline, "hang request was not received"
                time.sleep(0.02)

            started = time.monotonic()
            exit_code = stub_process.stop()

            assert exit_code == 0
            assert time.monotonic() - started < 5
            assert sock.recv(1024) == b""
    finally:
        if stub_process.process.poll() is None:
            stub_process.process.kill()
    log = stub_process.log_path.read_text()
    assert f"Listening on 127.0.0.1:{stub_process.port}." in log


# Real CLI against the stand-in


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"no output; stderr: {self.stderr}"
        return json.loads(lines[-1])


def cli_env(stub_process: StubProcess, home: Path, **extra: str) -> dict[str, str]:
    # Drop inherited ANTHROPIC_* and CLAUDE_* settings so the CLI uses only the
    # stand-in and the temporary config directory.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ANTHROPIC_", "CLAUDE_"))
    }
    env.update(
        ANTHROPIC_BASE_URL=stub_process.base_url,
        ANTHROPIC_API_KEY="sk-ant-stub-test",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_MAX_RETRIES="0",
        API_TIMEOUT_MS="20000",
        HOME=str(home),
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
    )
    env.update(extra)
    return env


def run_cli(
    executable: str | Path,
    prompt: str,
    env: dict[str, str],
    cwd: Path,
    *extra_args: str,
    output_format: str = "json",
) -> CliRun:
    args = [
        str(executable),
        "--model",
        "sonnet",
        "--print",
        "--output-format",
        output_format,
    ]
    if output_format == "stream-json":
        args.append("--verbose")
    completed = subprocess.run(
        [*args, *extra_args],
        input=prompt,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )
    return CliRun(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, Path]:
    home = tmp_path / "home"
    cwd = tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    return home, cwd


def test_cli_normal_reply(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    run = run_cli(claude_bin, "hello from ksi\nmore text", cli_env(stub, home), cwd)

    assert run.returncode == 0, run.stderr
    result = run.result
    assert list(result) == SUCCESS_RESULT_KEYS
    assert result["is_error"] is False
    assert result["api_error_status"] is None
    assert result["result"] == "stub answer: hello from ksi"
    assert result["num_turns"] == 1
    assert result["usage"]["input_tokens"] > 0
    assert uuid.UUID(result["session_id"])


def test_cli_stream_json_lines(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    run = run_cli(
        claude_bin, "streamed", cli_env(stub, home), cwd, output_format="stream-json"
    )

    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert [line["type"] for line in lines] == ["system", "assistant", "result"]
    assert lines[0]["subtype"] == "init"
    assert lines[-1]["result"] == "stub answer: streamed"


def test_cli_rate_limit_429(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    run = run_cli(claude_bin, "[stub:status=429] busy", cli_env(stub, home), cwd)

    assert run.returncode == 1
    result = run.result
    assert list(result) == ERROR_RESULT_KEYS
    assert result["is_error"] is True
    assert result["subtype"] == "success"
    assert result["api_error_status"] == 429
    assert result["result"] == RATE_LIMIT_TEXT


def test_cli_invalid_key_401(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    run = run_cli(claude_bin, "[stub:status=401] who", cli_env(stub, home), cwd)

    assert run.returncode == 1
    assert run.result["is_error"] is True
    assert run.result["api_error_status"] == 401
    assert run.result["result"] == INVALID_KEY_TEXT


@pytest.mark.parametrize(
    ("code", "message"), [(500, "Internal server error"), (529, "Overloaded")]
)
def test_cli_server_errors(
    claude_bin: str, stub: StubProcess, workspace, code: int, message: str
) -> None:
    home, cwd = workspace
    run = run_cli(claude_bin, f"[stub:status={code}] down", cli_env(stub, home), cwd)

    assert run.returncode == 1
    assert run.result["api_error_status"] == code
    expected = SERVER_ERROR_TEMPLATE.format(
        status=code, message=message, port=stub.port
    )
    assert run.result["result"] == expected


def test_cli_retry_after_429(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    key = uuid.uuid4().hex
    prompt = f"[stub:status=429,times=1,key={key}] try twice"

    first = run_cli(claude_bin, prompt, cli_env(stub, home), cwd)
    second = run_cli(claude_bin, prompt, cli_env(stub, home), cwd)

    assert first.returncode == 1
    assert first.result["api_error_status"] == 429
    assert second.returncode == 0, second.stderr
    assert second.result["is_error"] is False
    assert second.result["result"] == "stub answer: try twice"


def test_cli_runs_bash_tool(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    # The CLI blocks writes outside its working directory, so the file is in cwd.
    prompt = "[stub:bash=touch created.txt && echo touched] make a file"
    run = run_cli(
        claude_bin, prompt, cli_env(stub, home), cwd, "--allowedTools", "Bash"
    )

    assert run.returncode == 0, run.stderr
    assert (cwd / "created.txt").exists()
    assert run.result["result"] == "stub answer: bash done touched"
    assert run.result["num_turns"] == 2


def test_cli_request_timeout(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    env = cli_env(stub, home, API_TIMEOUT_MS="2000")
    started = time.monotonic()
    run = run_cli(claude_bin, "[stub:hang] wait", env, cwd)

    assert run.returncode == 1
    assert time.monotonic() - started < 15
    assert run.result["is_error"] is True
    assert run.result["api_error_status"] is None
    assert run.result["result"] == "Request timed out"


def test_cli_resume_session(claude_bin: str, stub: StubProcess, workspace) -> None:
    home, cwd = workspace
    first = run_cli(claude_bin, "first turn", cli_env(stub, home), cwd)
    assert first.returncode == 0, first.stderr
    session_id = first.result["session_id"]

    second = run_cli(
        claude_bin,
        "second turn\nignored",
        cli_env(stub, home),
        cwd,
        "--resume",
        session_id,
    )

    assert second.returncode == 0, second.stderr
    assert second.result["session_id"] == session_id
    assert second.result["result"] == "stub answer: second turn"


def test_fake_matches_cli_output(
    claude_bin: str, stub: StubProcess, workspace: tuple[Path, Path]
) -> None:
    home, cwd = workspace
    env = cli_env(stub, home)
    for prompt in [
        "same keys",
        "[stub:status=429] x",
        "[stub:status=401] x",
        "[stub:status=529] x",
    ]:
        real = run_cli(claude_bin, prompt, env, cwd)
        fake = run_cli(FAKE_CLAUDE, prompt, env, cwd)

        assert fake.returncode == real.returncode, prompt
        assert list(fake.result) == list(real.result), prompt
        assert list(fake.result["usage"]) == list(real.result["usage"]), prompt
        assert fake.result["result"] == real.result["result"], prompt
        assert fake.result["api_error_status"] == real.result["api_error_status"], (
            prompt
        )


# Fake CLI on its own


def fake_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HOME=str(home), ANTHROPIC_BASE_URL="http://127.0.0.1:9")
    env.update(extra)
    return env


def test_fake_normal_reply(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    run = run_cli(FAKE_CLAUDE, "  \nhello fake\nmore", fake_env(home), cwd)

    assert run.returncode == 0, run.stderr
    assert list(run.result) == SUCCESS_RESULT_KEYS
    assert run.result["is_error"] is False
    assert run.result["result"] == "stub answer: hello fake"
    assert uuid.UUID(run.result["session_id"]).version == 4


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (429, RATE_LIMIT_TEXT),
        (401, INVALID_KEY_TEXT),
        (
            500,
            SERVER_ERROR_TEMPLATE.format(
                status=500, message="Internal server error", port=9
            ),
        ),
        (400, "API Error: 400 Invalid request (stub)."),
    ],
)
def test_fake_status_error(
    workspace: tuple[Path, Path], code: int, expected: str
) -> None:
    home, cwd = workspace
    run = run_cli(FAKE_CLAUDE, f"[stub:status={code}] x", fake_env(home), cwd)

    assert run.returncode == 1
    assert list(run.result) == ERROR_RESULT_KEYS
    assert run.result["is_error"] is True
    assert run.result["api_error_status"] == code
    assert run.result["result"] == expected


def test_fake_times_key_fails_then_answers(
    workspace: tuple[Path, Path], tmp_path: Path
) -> None:
    home, cwd = workspace
    env = fake_env(home, FAKE_CLAUDE_STATE_DIR=str(tmp_path / "state"))
    prompt = "[stub:status=529,times=2,key=job-1] retry"

    runs = [run_cli(FAKE_CLAUDE, prompt, env, cwd) for _ in range(3)]

    assert [run.returncode for run in runs] == [1, 1, 0]
    assert runs[0].result["api_error_status"] == 529
    assert runs[2].result["result"] == "stub answer: retry"


def test_fake_times_needs_state_dir(
    workspace: tuple[Path, Path],
) -> None:
    home, cwd = workspace
    env = fake_env(home)
    env.pop("FAKE_CLAUDE_STATE_DIR", None)
    prompt = "[stub:status=429,times=1,key=job-2] retry"

    runs = [run_cli(FAKE_CLAUDE, prompt, env, cwd) for _ in range(2)]

    assert [run.returncode for run in runs] == [1, 1]


def test_fake_runs_bash(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    marker_file = cwd / "from_fake.txt"
    env = fake_env(home, FAKE_TEST_VALUE="inherited")
    prompt = f"[stub:bash=echo $FAKE_TEST_VALUE > {marker_file} && echo ok] go"
    run = run_cli(FAKE_CLAUDE, prompt, env, cwd, output_format="stream-json")

    assert run.returncode == 0, run.stderr
    assert marker_file.read_text() == "inherited\n"
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["type"] for line in lines] == [
        "system",
        "assistant",
        "user",
        "assistant",
        "result",
    ]
    assert lines[1]["message"]["content"][0]["input"]["command"].startswith("echo ")
    assert lines[-1]["result"] == "stub answer: bash done ok"
    assert lines[-1]["num_turns"] == 2


def test_fake_bash_failure(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    run = run_cli(
        FAKE_CLAUDE, "[stub:bash=echo out; echo err >&2; exit 3] x", fake_env(home), cwd
    )

    assert run.returncode == 0, run.stderr
    assert run.result["result"] == "stub answer: bash error Exit code 3 out err"


def test_fake_slow_and_resume(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    session_id = str(uuid.uuid4())
    started = time.monotonic()
    run = run_cli(
        FAKE_CLAUDE,
        "[stub:slow=0.3] later",
        fake_env(home),
        cwd,
        "--resume",
        session_id,
    )

    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started >= 0.3
    assert run.result["session_id"] == session_id
    assert run.result["result"] == "stub answer: later"


def test_fake_hang_until_killed(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    process = subprocess.Popen(
        [str(FAKE_CLAUDE), "--print", "--output-format", "json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=fake_env(home),
        cwd=cwd,
    )
    try:
        process.stdin.write(b"[stub:hang] x")
        process.stdin.close()
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_fake_stream_json_requires_verbose(workspace: tuple[Path, Path]) -> None:
    home, cwd = workspace
    completed = subprocess.run(
        [str(FAKE_CLAUDE), "--print", "--output-format", "stream-json"],
        input="x",
        capture_output=True,
        text=True,
        env=fake_env(home),
        cwd=cwd,
        check=False,
    )

    assert completed.returncode == 1
    assert "requires --verbose" in completed.stderr
