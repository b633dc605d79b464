"""The trivial task that every system under test runs, and its timing record.

A task runs the instant fake ``claude`` (``bench/instant_claude``) with a
prompt on stdin, as a KSI worker does. It stores when the task function
started and when the child process started, so that each system's latency is
measured to the same two points.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import redis

#: The instant fake of the Claude CLI: prints its start time in a result line.
INSTANT_CLAUDE = Path(__file__).resolve().parent / "instant_claude"

#: Redis list of the baselines' timing records, one "TAG ACTOR CHILD PID" a task.
STARTED_KEY = "bench:started"

PROMPT = b"Say hello from the benchmark."


def run_instant_claude() -> float:
    """Run the instant fake and return the Unix time at which it started."""
    done = subprocess.run(
        [str(INSTANT_CLAUDE)], input=PROMPT, capture_output=True, check=True
    )
    return child_start(done.stdout)


def child_start(stdout: bytes) -> float:
    """Return the start time that the instant fake printed in its result line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(b"{"):
            return float(json.loads(line)["result"])
    raise ValueError(f"no result line in the instant fake's output: {stdout!r}")


def run_and_record(client: redis.Redis, tag: str) -> None:
    """Do one baseline task's work and push its timing record."""
    actor_started = time.time()
    child_started = run_instant_claude()
    client.rpush(
        STARTED_KEY, f"{tag} {actor_started!r} {child_started!r} {os.getpid()}"
    )
