"""Local stand-in for the Anthropic Messages API.

It responds to the requests that the Claude Code CLI sends, so the real CLI can
run with no network. Markers of the form ``[stub:...]`` in the prompt select the
scenario:

- no marker: a streamed text reply ``stub answer: <first line of the prompt>``.
- ``[stub:slow=N]``: wait N seconds (float) before the first byte, then reply.
- ``[stub:status=CODE]``: HTTP CODE with an Anthropic-shaped error body.
- ``[stub:status=CODE,times=K,key=NAME]``: fail the first K requests that carry
  key NAME, then reply normally. Counts live in the server process.
- ``[stub:bash=COMMAND]``: request a ``Bash`` tool call that runs COMMAND, then
  reply ``stub answer: bash done <tool output>``, or ``bash error`` in place of
  ``bash done`` when the tool result is an error. COMMAND ends at the first
  ``]``, so it cannot contain ``]``.
- ``[stub:hang]``: send no response. The handler returns when the client closes
  the connection or the server stops.

Markers are read from the prompt turn, which is the latest user message with
text in it. User messages that contain only tool results do not count, so the
bash scenario keeps its marker while the CLI sends the tool result back.

``GET /_stub/stats`` returns JSON request counts by scenario and by ``key=``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import select
import socket
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

MARKER_PATTERN = re.compile(r"\[stub:([^\]]*)\]")
SYSTEM_REMINDER_PATTERN = re.compile(
    r"<system-reminder>.*?</system-reminder>", re.DOTALL
)
REPLY_PREFIX = "stub answer: "
MAX_ECHO_CHARS = 200
TEXT_CHUNK_COUNT = 3

# Error types of the Anthropic API, by HTTP status.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES: dict[int, str] = {
    400: "Invalid request (stub).",
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found.",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "This request would exceed the rate limit for your organization (stub).",
    500: "Internal server error",
    503: "Service unavailable (stub).",
    529: "Overloaded",
}

# How often a held request checks for a closed client or a stopping server.
HANG_POLL_SECONDS = 0.25


class MarkerError(ValueError):
    """Raised for a ``[stub:...]`` marker that cannot be parsed."""


@dataclass(frozen=True)
class Scenario:
    """Behaviour that the markers in one prompt select."""

    slow_seconds: float = 0.0
    status: int | None = None
    times: int | None = None
    key: str | None = None
    bash_command: str | None = None
    hang: bool = False


def parse_markers(text: str) -> Scenario:
    """Parse every ``[stub:...]`` marker in text into one Scenario.

    Raises MarkerError for an unknown marker or an invalid value.
    """
    fields: dict[str, Any] = {}
    for match in MARKER_PATTERN.finditer(text):
        body = match.group(1).strip()
        if body.startswith("bash="):
            # The command may contain commas and "=", so it takes the whole rest.
            fields["bash_command"] = body.removeprefix("bash=")
            continue
        if body == "hang":
            fields["hang"] = True
            continue
        for item in body.split(","):
            name, sep, value = item.partition("=")
            name = name.strip()
            value = value.strip()
            if not sep:
                raise MarkerError(
                    f"Invalid stub marker {match.group(0)!r}: expected hang, "
                    f"bash=COMMAND or name=value fields, got {item!r}."
                )
            fields.update(_parse_marker_field(match.group(0), name, value))
    if "times" in fields and "status" not in fields:
        raise MarkerError("Invalid stub marker: times= needs status= too.")
    if "status" in fields and "times" in fields and "key" not in fields:
        fields["key"] = f"status={fields['status']}"
    return Scenario(**fields)


def _parse_marker_field(marker: str, name: str, value: str) -> dict[str, Any]:
    try:
        if name == "slow":
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(value)
            return {"slow_seconds": seconds}
        if name == "status":
            status = int(value)
            if not 100 <= status <= 599:
                raise ValueError(value)
            return {"status": status}
        if name == "times":
            times = int(value)
            if times < 0:
                raise ValueError(value)
            return {"times": times}
        if name == "key":
            if not value:
                raise ValueError(value)
            return {"key": value}
    except ValueError:
        raise MarkerError(
            f"Invalid value {value!r} for {name!r} in stub marker {marker!r}."
        ) from None
    raise MarkerError(
        f"Unknown field {name!r} in stub marker {marker!r}. Known fields: "
        "slow, status, times, key, bash, hang."
    )


def strip_markers(text: str) -> str:
    """Return text without its ``[stub:...]`` markers."""
    return MARKER_PATTERN.sub("", text)


def first_line(text: str) -> str:
    """Return the first non-blank line of text without markers, cut to 200 chars."""
    for line in strip_markers(text).splitlines():
        line = line.strip()
        if line:
            return line[:MAX_ECHO_CHARS]
    return ""


def reply_text(prompt: str) -> str:
    """Return the text of the normal reply to prompt."""
    return REPLY_PREFIX + first_line(prompt)


def bash_reply_text(tool_output: str, is_error: bool) -> str:
    """Return the final reply after the Bash tool result, on one line."""
    output = " ".join(tool_output.split())[:MAX_ECHO_CHARS]
    verdict = "bash error" if is_error else "bash done"
    return f"{REPLY_PREFIX}{verdict} {output}".rstrip()


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """Return an Anthropic-shaped error body for an HTTP status."""
    return {
        "type": "error",
        "error": {
            "type": ERROR_TYPES.get(status, "api_error"),
            "message": message or ERROR_MESSAGES.get(status, f"Stub error {status}."),
        },
    }


def estimate_tokens(text: str) -> int:
    """Estimate a token count as one token per four characters."""
    return max(1, len(text) // 4)


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, dict) and block.get("type") == "text":
        return str(block.get("text", ""))
    return ""


def _content_blocks(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return content
    return []


def prompt_text(message: dict[str, Any]) -> str:
    """Return the user's text in a message, without ``<system-reminder>`` parts.

    The CLI adds context such as the current date as a system-reminder text
    block in the same message as the prompt.
    """
    parts = [_block_text(block) for block in _content_blocks(message)]
    text = "\n".join(part for part in parts if part)
    return SYSTEM_REMINDER_PATTERN.sub("", text).strip()


def find_prompt_text(messages: list[Any]) -> str:
    """Return the text of the latest user message that has prompt text."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = prompt_text(message)
            if text:
                return text
    return ""


def find_tool_result(message: Any) -> tuple[str, bool] | None:
    """Return the output text and error flag of a tool_result in message."""
    if not isinstance(message, dict) or message.get("role") != "user":
        return None
    for block in _content_blocks(message):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content", "")
            if isinstance(content, list):
                content = "\n".join(_block_text(part) for part in content)
            return str(content), bool(block.get("is_error", False))
    return None


def latest_user_message(messages: list[Any]) -> Any:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message
    return None


def bash_tool_input(tools: list[Any], command: str) -> dict[str, Any] | None:
    """Return the input for a Bash tool call, or None if the request has no Bash.

    Only fields that the tool's input schema declares are set, because the CLI
    sends the schema with ``additionalProperties: false``.
    """
    for tool in tools:
        if isinstance(tool, dict) and tool.get("name") == "Bash":
            properties = tool.get("input_schema", {}).get("properties", {})
            tool_input: dict[str, Any] = {"command": command}
            if "description" in properties:
                tool_input["description"] = "run"
            return tool_input
    return None


class StubState:
    """Request counters shared by all handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scenarios: Counter[str] = Counter()
        self._key_counts: Counter[str] = Counter()
        self.requests = 0
        self.stopping = threading.Event()

    def record(self, scenario: str) -> None:
        with self._lock:
            self.requests += 1
            self._scenarios[scenario] += 1

    def next_key_count(self, key: str) -> int:
        """Count one more request for key and return the new count."""
        with self._lock:
            self._key_counts[key] += 1
            return self._key_counts[key]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "scenarios": dict(self._scenarios),
                "keys": dict(self._key_counts),
            }


class StubServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries the shared StubState."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.state = StubState()
        super().__init__(address, StubRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up mid-stream is normal, so it gets no traceback.
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError)):
            logger.info("Client %s disconnected: %s.", client_address, error)
            return
        logger.exception("Request from %s failed.", client_address)

    def stop(self) -> None:
        """Stop serve_forever and release held requests. Call from another thread."""
        self.state.stopping.set()
        self.shutdown()
        self.server_close()


class StubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stubapi"
    server: StubServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # Routing

    def do_HEAD(self) -> None:
        # The CLI sends HEAD / before its first request to check the connection.
        self.server.state.record("head")
        self._send_empty(HTTPStatus.OK)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_stub/stats":
            self._send_json(HTTPStatus.OK, self.server.state.snapshot())
            return
        self._send_not_found()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/v1/messages":
            self._handle_messages()
        elif path == "/v1/messages/count_tokens":
            self._handle_count_tokens()
        else:
            self._discard_body()
            self._send_not_found()

    def do_PUT(self) -> None:
        self._discard_body()
        self._send_not_found()

    do_DELETE = do_PUT
    do_PATCH = do_PUT

    # Requests

    def _handle_count_tokens(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        self.server.state.record("count_tokens")
        self._send_json(HTTPStatus.OK, {"input_tokens": estimate_tokens(raw)})

    def _handle_messages(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        try:
            request = json.loads(raw)
        except json.JSONDecodeError as error:
            self.server.state.record("invalid_request")
            self._send_error(400, f"Request body is not valid JSON: {error}.")
            return
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list) or not messages:
            self.server.state.record("invalid_request")
            self._send_error(400, "messages: field is missing or empty.")
            return
        try:
            scenario = parse_markers(find_prompt_text(messages))
        except MarkerError as error:
            self.server.state.record("invalid_marker")
            self._send_error(400, str(error))
            return

        if scenario.hang:
            self.server.state.record("hang")
            self._hold_connection()
            return
        if scenario.slow_seconds and self.server.state.stopping.wait(
            scenario.slow_seconds
        ):
            self.close_connection = True
            return
        if scenario.status is not None and self._should_fail(scenario):
            self.server.state.record("status")
            self._send_error(scenario.status)
            return
        self._reply(request, messages, scenario, raw)

    def _should_fail(self, scenario: Scenario) -> bool:
        if scenario.times is None or scenario.key is None:
            return True
        return self.server.state.next_key_count(scenario.key) <= scenario.times

    def _reply(
        self,
        request: dict[str, Any],
        messages: list[Any],
        scenario: Scenario,
        raw: str,
    ) -> None:
        label, blocks, stop_reason = self._reply_content(request, messages, scenario)
        self.server.state.record(label)
        logger.debug("Replying with scenario %s.", label)
        message = {
            "id": "msg_stub_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": str(request.get("model", "claude-stub")),
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": estimate_tokens(raw),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": estimate_tokens(json.dumps(blocks)),
                "service_tier": "standard",
            },
        }
        if request.get("stream"):
            self._stream_message(message)
        else:
            self._send_json(HTTPStatus.OK, message)

    def _reply_content(
        self, request: dict[str, Any], messages: list[Any], scenario: Scenario
    ) -> tuple[str, list[dict[str, Any]], str]:
        """Return the scenario label, content blocks and stop_reason of a reply."""
        if scenario.bash_command is None:
            text = reply_text(find_prompt_text(messages))
            label = "slow" if scenario.slow_seconds else "normal"
            return label, [{"type": "text", "text": text}], "end_turn"

        tool_result = find_tool_result(latest_user_message(messages))
        if tool_result is not None:
            text = bash_reply_text(*tool_result)
            return "bash_result", [{"type": "text", "text": text}], "end_turn"

        tools = request.get("tools")
        tool_input = bash_tool_input(
            tools if isinstance(tools, list) else [], scenario.bash_command
        )
        if tool_input is None:
            text = REPLY_PREFIX + "bash tool not offered in the request"
            return "bash_unavailable", [{"type": "text", "text": text}], "end_turn"
        tool_use = {
            "type": "tool_use",
            "id": "toolu_stub_" + uuid.uuid4().hex[:24],
            "name": "Bash",
            "input": tool_input,
        }
        return "bash_tool_use", [tool_use], "tool_use"

    # Responses

    def _stream_message(self, message: dict[str, Any]) -> None:
        """Send message as the server-sent events of a streamed response."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", _request_id())
        self.end_headers()

        usage = message["usage"]
        start = dict(message, content=[], stop_reason=None)
        start["usage"] = dict(usage, output_tokens=1)
        self._send_event("message_start", {"type": "message_start", "message": start})
        self._send_event("ping", {"type": "ping"})
        for index, block in enumerate(message["content"]):
            self._stream_block(index, block)
        self._send_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        self._send_event("message_stop", {"type": "message_stop"})
        self._write_chunk(b"")

    def _stream_block(self, index: int, block: dict[str, Any]) -> None:
        if block["type"] == "tool_use":
            start_block = dict(block, input={})
            delta_type, delta_field = "input_json_delta", "partial_json"
            payload = json.dumps(block["input"])
        else:
            start_block = dict(block, text="")
            delta_type, delta_field = "text_delta", "text"
            payload = block["text"]
        self._send_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": start_block,
            },
        )
        for piece in _split_chunks(payload, TEXT_CHUNK_COUNT):
            self._send_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": delta_type, delta_field: piece},
                },
            )
        self._send_event(
            "content_block_stop", {"type": "content_block_stop", "index": index}
        )

    def _send_event(self, event: str, data: dict[str, Any]) -> None:
        frame = f"event: {event}\ndata: {json.dumps(data)}\n\n"
        self._write_chunk(frame.encode())

    def _write_chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked body. Empty data ends the body."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send_error(self, status: int, message: str | None = None) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            # 529 and other codes that the http module does not define.
            phrase = "Overloaded" if status == 529 else "Error"
        body = json.dumps(error_body(status, message)).encode()
        self.send_response(status, phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", _request_id())
        self.send_header(
            "x-should-retry", "true" if status >= 500 or status == 429 else "false"
        )
        self.end_headers()
        self.wfile.write(body)

    def _send_not_found(self) -> None:
        self.server.state.record("not_found")
        self._send_error(404, f"Not found: {self.command} {urlsplit(self.path).path}")

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", _request_id())
        self.end_headers()
        self.wfile.write(body)

    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # Helpers

    def _read_body(self) -> str | None:
        """Read the request body, or send 400 and return None if it is invalid.

        NOTE: Only Content-Length bodies are read. A chunked request body, which
        the CLI does not send, is read as empty and rejected as invalid JSON.
        """
        length_header = self.headers.get("Content-Length", "0")
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            self._send_error(400, f"Invalid Content-Length {length_header!r}.")
            return None
        raw = self.rfile.read(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._send_error(400, "Request body is not valid UTF-8.")
            return None

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            return
        self.rfile.read(length)

    def _hold_connection(self) -> None:
        """Send no response until the client disconnects or the server stops."""
        self.close_connection = True
        connection: socket.socket = self.connection
        while not self.server.state.stopping.wait(HANG_POLL_SECONDS):
            readable, _, _ = select.select([connection], [], [], 0)
            if not readable:
                continue
            try:
                if connection.recv(1, socket.MSG_PEEK) == b"":
                    logger.debug("Client closed a held connection.")
                    return
            except OSError as error:
                logger.debug("Held connection failed: %s.", error)
                return
            # The client sent more bytes without closing, so keep holding.


def _split_chunks(text: str, count: int) -> list[str]:
    if not text:
        return [""]
    size = max(1, math.ceil(len(text) / count))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _request_id() -> str:
    return "req_stub_" + secrets.token_hex(12)
