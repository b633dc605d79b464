"""Parsing and validation of daemon requests."""

import json

import pytest

from daemon.protocol import (
    MAX_PROMPT_BYTES,
    ProtocolError,
    parse_request,
    validate_task_params,
)


def _error(callable_, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        callable_(*args)
    return info.value


def test_parse_request_returns_parts():
    line = json.dumps({"id": 7, "command": "HEALTH_CHECK", "params": {}}).encode()
    assert parse_request(line) == (7, "HEALTH_CHECK", {})


def test_parse_request_without_params():
    assert parse_request(b'{"command": "HEALTH_CHECK"}')[2] == {}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"\xff\xfe", "INVALID_JSON"),
        (b"[1, 2]", "INVALID_REQUEST"),
        (b'{"params": {}}', "INVALID_REQUEST"),
        (b'{"command": 5}', "INVALID_REQUEST"),
        (b'{"command": "X", "params": [1]}', "INVALID_REQUEST"),
        (b"[" * 100_000 + b"]" * 100_000, "INVALID_JSON"),
    ],
)
def test_parse_request_rejects(line, code):
    assert _error(parse_request, line).code == code


def test_task_params_minimal():
    fields = validate_task_params({"prompt": "hi"})
    assert fields == {"prompt": "hi", "prompt_bytes": 2}


def test_task_params_all_options():
    fields = validate_task_params(
        {
            "prompt": "hi",
            "model": "claude-sonnet-4-5",
            "timeout_s": 30,
            "allowed_tools": ["Bash", "Bash(git:*)", "mcp__server__tool"],
            "session_id": "0b6c7f6e-1111-4a4a-9e9e-123456789abc",
            "max_retries": 0,
        }
    )
    assert fields["timeout_s"] == 30
    assert fields["allowed_tools"] == ["Bash", "Bash(git:*)", "mcp__server__tool"]
    assert fields["max_retries"] == 0


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, str(MAX_PROMPT_BYTES)),
        ({"prompt": "x", "model": "bad model; rm -rf"}, "model"),
        ({"prompt": "x", "timeout_s": 0}, "timeout_s"),
        ({"prompt": "x", "timeout_s": "60"}, "timeout_s"),
        ({"prompt": "x", "timeout_s": True}, "timeout_s"),
        ({"prompt": "x", "timeout_s": 10**9}, "timeout_s"),
        ({"prompt": "x", "allowed_tools": "Bash"}, "allowed_tools"),
        ({"prompt": "x", "allowed_tools": ["rm -rf /"]}, "allowed_tools"),
        ({"prompt": "x", "session_id": "../etc"}, "session_id"),
        ({"prompt": "x", "max_retries": 1.5}, "max_retries"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
def test_task_params_rejects_and_names_field(params, named):
    error = _error(validate_task_params, params)
    assert error.code == "INVALID_PARAMS"
    assert named in error.message
