"""Wire format of the daemon protocol and validation of command parameters.

One JSON object per line each way. A request is
``{"command": NAME, "params": {...}, "id": optional}``; a reply is
``{"id": ..., "status": "ok", "result": {...}}`` or
``{"id": ..., "status": "error", "error": {"code": CODE, "message": TEXT}}``.

SUBSCRIBE turns its connection into a stream (see :mod:`daemon.event_commands`):
after the ok reply, each event arrives as one line ``{"event": EVENT}`` where
EVENT is ``{"id": "1700000000000-0", "event_type": "TASK_PROGRESS",
"task_id": "..." or null, "attempt": 1, "ts": 1700000000.123,
"payload": {...}, "from_agent": "..." or null}``. ``id`` is the event's
Redis stream id, to pass as ``since`` when subscribing again; ``ts`` is Unix
time in seconds; ``from_agent`` is set on events sent with PUBLISH. The
stream ends with an error line (code ``SLOW_SUBSCRIBER``, ``SHUTTING_DOWN``
or ``UNAVAILABLE``) or when either side closes the connection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ksi_worker.settings import MAX_TASK_TIMEOUT_S

#: Longest request line accepted, in bytes; longer lines close the connection.
#: It leaves room for a prompt at MAX_PROMPT_BYTES whose every character a
#: client escaped as ``\uXXXX`` (6 bytes for 1).
MAX_LINE_BYTES = 7 * 1024 * 1024

#: Largest prompt accepted, in UTF-8 bytes.
MAX_PROMPT_BYTES = 1024 * 1024

#: Most tool names in one task's ``allowed_tools``.
MAX_ALLOWED_TOOLS = 64

MODEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\[\]-]{0,127}$")
TOOL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}(\([^()\n]{0,512}\))?$")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

#: Description of the values each pattern accepts, for error messages.
FORMAT_HINTS = {
    MODEL_PATTERN.pattern: (
        "a model name or alias such as 'sonnet' or 'claude-sonnet-4-5': "
        "letters, digits and . _ : - [ ], at most 128 characters"
    ),
    ID_PATTERN.pattern: "1 to 128 letters, digits, '.', '_', ':' or '-'",
}


class ProtocolError(Exception):
    """A request the daemon rejects; sent back as an error reply.

    Parameters:
      code: Machine-readable error code, such as ``INVALID_PARAMS``.
      message: Sentence naming the value at fault and what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ProtocolError:
    return ProtocolError("INVALID_PARAMS", message)


def ok_reply(request_id: Any, result: Mapping[str, Any]) -> bytes:
    return _line({"id": request_id, "status": "ok", "result": result})


def error_reply(request_id: Any, code: str, message: str) -> bytes:
    return _line(
        {
            "id": request_id,
            "status": "error",
            "error": {"code": code, "message": message},
        }
    )


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """Decode one request line into its id, command and params.

    Raises ProtocolError for invalid UTF-8, invalid JSON or a wrong shape.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(
            "INVALID_JSON", f"request is not valid UTF-8 (byte {error.start})"
        ) from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise ProtocolError(
            "INVALID_JSON", "request JSON is nested too deeply"
        ) from None
    except json.JSONDecodeError as error:
        raise ProtocolError(
            "INVALID_JSON",
            f"request is not valid JSON: {error.msg} at column {error.colno}",
        ) from None
    if not isinstance(request, dict):
        raise ProtocolError(
            "INVALID_REQUEST",
            f"request must be a JSON object, got {type(request).__name__}",
        )
    request_id = request.get("id")
    command = request.get("command")
    if not isinstance(command, str) or not command:
        raise ProtocolError(
            "INVALID_REQUEST", 'request needs a "command" string such as "HEALTH_CHECK"'
        )
    params = request.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(
            "INVALID_REQUEST",
            f'"params" must be a JSON object, got {type(params).__name__}',
        )
    return request_id, command, params


def reject_unknown(params: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise invalid(
            f"unknown parameter {unknown[0]!r}; accepted: {', '.join(sorted(known))}"
        )


def require_str(params: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = params.get(name)
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {_type(value)}")
    if not pattern.match(value):
        raise invalid(
            f"{name}={_show(value)} has an invalid format; use "
            f"{FORMAT_HINTS.get(pattern.pattern, 'the documented format')}"
        )
    return value


def optional_str(
    params: Mapping[str, Any], name: str, pattern: re.Pattern[str]
) -> str | None:
    if params.get(name) is None:
        return None
    return require_str(params, name, pattern)


def optional_number(
    params: Mapping[str, Any],
    name: str,
    *,
    minimum: float,
    maximum: float,
    integer: bool = False,
) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise invalid(f"{name} must be {kind}, got {_type(value)}")
    if not minimum <= value <= maximum:
        raise invalid(f"{name}={value} is out of range; use {minimum:g} to {maximum:g}")
    return value


def validate_task_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check QUEUE_TASK parameters and return the fields of the task record."""
    reject_unknown(params, QUEUE_TASK_PARAMS)
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise invalid(f"prompt is required and must be a string, got {_type(prompt)}")
    if not prompt.strip():
        raise invalid("prompt is empty; send the text Claude should work on")
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        raise invalid(
            f"prompt is {size} bytes, above the limit of {MAX_PROMPT_BYTES} bytes"
        )

    fields: dict[str, Any] = {"prompt": prompt, "prompt_bytes": size}
    fields["model"] = optional_str(params, "model", MODEL_PATTERN)
    fields["timeout_s"] = optional_number(
        params, "timeout_s", minimum=1, maximum=MAX_TASK_TIMEOUT_S
    )
    fields["idle_timeout_s"] = optional_number(
        params, "idle_timeout_s", minimum=1, maximum=MAX_TASK_TIMEOUT_S
    )
    fields["session_id"] = optional_str(params, "session_id", ID_PATTERN)
    fields["agent_id"] = optional_str(params, "agent_id", ID_PATTERN)
    fields["idempotency_key"] = optional_str(params, "idempotency_key", ID_PATTERN)
    retry_on_timeout = params.get("retry_on_timeout")
    if retry_on_timeout is not None and not isinstance(retry_on_timeout, bool):
        raise invalid(
            f"retry_on_timeout must be true or false, got {_type(retry_on_timeout)}"
        )
    fields["retry_on_timeout"] = retry_on_timeout
    fields["max_retries"] = optional_number(
        params, "max_retries", minimum=0, maximum=20, integer=True
    )
    fields["retry_min_backoff_s"] = optional_number(
        params, "retry_min_backoff_s", minimum=0, maximum=86_400
    )
    fields["retry_max_backoff_s"] = optional_number(
        params, "retry_max_backoff_s", minimum=0, maximum=86_400
    )

    tools = params.get("allowed_tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise invalid(
                f"allowed_tools must be a list of strings, got {_type(tools)}"
            )
        if len(tools) > MAX_ALLOWED_TOOLS:
            raise invalid(
                f"allowed_tools has {len(tools)} entries, above the limit of "
                f"{MAX_ALLOWED_TOOLS}"
            )
        for tool in tools:
            if not TOOL_PATTERN.match(tool):
                raise invalid(
                    f"allowed_tools entry {_show(tool)} is not a tool name such as "
                    f"'Bash', 'Read' or 'Bash(git:*)'"
                )
    fields["allowed_tools"] = tools
    return {name: value for name, value in fields.items() if value is not None}


QUEUE_TASK_PARAMS = {
    "prompt",
    "model",
    "timeout_s",
    "idle_timeout_s",
    "allowed_tools",
    "session_id",
    "agent_id",
    "idempotency_key",
    "retry_on_timeout",
    "max_retries",
    "retry_min_backoff_s",
    "retry_max_backoff_s",
}


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
