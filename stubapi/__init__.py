"""Local stand-in for the Anthropic Messages API, so the Claude Code CLI runs offline.

Run it with ``python -m stubapi --host 127.0.0.1 --port 0 --port-file PATH``.
The docstring of ``stubapi.server`` lists the ``[stub:...]`` prompt markers.
"""

from stubapi.server import (
    MarkerError,
    Scenario,
    StubServer,
    bash_reply_text,
    error_body,
    first_line,
    parse_markers,
    reply_text,
)

__all__ = [
    "MarkerError",
    "Scenario",
    "StubServer",
    "bash_reply_text",
    "error_body",
    "first_line",
    "parse_markers",
    "reply_text",
]
