"""The three systems under test: a KSI bundle, plain Dramatiq and plain Celery.

Each one starts its own Redis and worker processes, sends the trivial task of
``bench.baseline_task`` (for KSI: a QUEUE_TASK whose ``claude`` is the instant
fake), reports when each task's function and child process started, and stops
every process it started. Every system runs 2 worker processes of 1 thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from bench.baseline_task import INSTANT_CLAUDE, PROMPT, STARTED_KEY
from bench.private_redis import PrivateRedis
from ksi_worker import keys
from tests.bundle import Bundle, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Worker processes of every system, each with one thread.
WORKERS = 2

#: Seconds a system may take to start and run its warm-up tasks.
START_TIMEOUT_S = 90.0

#: Seconds between two checks for finished tasks.
POLL_INTERVAL_S = 0.002


@dataclass(frozen=True)
class Timing:
    """When one task was sent, and when its function and its child started.

    All three are Unix times in seconds. ``worker`` names the worker process
    (its pid) that ran the task.
    """

    sent: float
    actor: float
    child: float
    worker: int


class System(ABC):
    """A task queue under test, with its Redis and its worker processes."""

    #: Short name used in tables: "KSI", "Dramatiq" or "Celery".
    name: str

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> list[str]:
        """Stop every process; return those that had to be killed."""

    @abstractmethod
    def _send(self) -> str:
        """Send one task and return its tag."""

    @abstractmethod
    def _finished(self, tags: list[str]) -> dict[str, Timing]:
        """Return the timings of those of ``tags`` whose task has finished."""

    @abstractmethod
    def programs(self) -> dict[str, list[psutil.Process]]:
        """Return the live processes of each program of the group."""

    @abstractmethod
    def clear(self) -> None:
        """Forget the tasks sent so far and restart finished_count at 0."""

    @abstractmethod
    def finished_count(self) -> int:
        """Return how many tasks finished since clear(), cheaply."""

    def send(self) -> str:
        """Send one task, note when, and return its tag."""
        sent = time.time()
        tag = self._send()
        self.sent[tag] = sent
        return tag

    def send_many(self, count: int) -> list[str]:
        return [self.send() for _ in range(count)]

    def wait_finished(self, tags: list[str], timeout_s: float) -> dict[str, Timing]:
        """Wait until every task of ``tags`` has finished; return their timings."""
        deadline = time.monotonic() + timeout_s
        done: dict[str, Timing] = {}
        while True:
            missing = [tag for tag in tags if tag not in done]
            if missing:
                done.update(self._finished(missing))
            if len(done) == len(tags):
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: {len(tags) - len(done)} of {len(tags)} tasks "
                    f"did not finish within {timeout_s} s"
                )
            time.sleep(POLL_INTERVAL_S)

    def warm_up(self) -> None:
        """Run tasks until every worker process has run at least one."""
        deadline = time.monotonic() + START_TIMEOUT_S
        workers: set[int] = set()
        while len(workers) < WORKERS:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: only workers {sorted(workers)} ran a task within "
                    f"{START_TIMEOUT_S} s"
                )
            tags = self.send_many(2 * WORKERS)
            timings = self.wait_finished(tags, START_TIMEOUT_S)
            workers.update(timing.worker for timing in timings.values())

    def all_processes(self) -> list[psutil.Process]:
        return [process for group in self.programs().values() for process in group]


def process_tree(pid: int) -> list[psutil.Process]:
    """Return a process and its live descendants, or [] if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def end_processes(processes: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """SIGTERM each process, SIGKILL what is left after ``timeout_s``.

    Returns the pids and commands of the processes, descendants included, that
    had to be killed.
    """
    trees = [process_tree(process.pid) for process in processes]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    killed = []
    for tree in trees:
        for member in tree:
            try:
                if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                    killed.append(f"{member.pid} {' '.join(member.cmdline())}")
                    member.kill()
            except psutil.Error:
                pass
    for process in processes:
        if process.poll() is None:
            process.wait()
    return killed


class BaselineSystem(System):
    """Worker processes of a plain framework on a PrivateRedis.

    Subclasses give the command of one worker process and the send call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.redis = PrivateRedis()
        self.workers: list[subprocess.Popen] = []
        self.client: redis.Redis | None = None

    @abstractmethod
    def worker_command(self, number: int) -> list[str]: ...

    def worker_env(self) -> dict[str, str]:
        return {**os.environ, "BENCH_REDIS_URL": self.redis.url}

    def start(self) -> None:
        self.redis.start()
        self.client = self.redis.client()
        log = self.redis.folder / "workers.log"
        with log.open("ab") as output:
            for number in range(WORKERS):
                self.workers.append(
                    subprocess.Popen(
                        self.worker_command(number),
                        cwd=PROJECT_ROOT,
                        env=self.worker_env(),
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )
        try:
            self.warm_up()
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{log.read_text(errors='replace')}") from None

    def stop(self) -> list[str]:
        killed = end_processes(self.workers, timeout_s=15)
        self.workers = []
        self.redis.stop()
        return killed

    def _finished(self, tags: list[str]) -> dict[str, Timing]:
        assert self.client is not None
        wanted = set(tags)
        found = {}
        for entry in self.client.lrange(STARTED_KEY, 0, -1):
            tag, actor, child, worker = entry.decode().split()
            if tag in wanted:
                found[tag] = Timing(
                    self.sent[tag], float(actor), float(child), int(worker)
                )
        return found

    def finished_count(self) -> int:
        assert self.client is not None
        return self.client.llen(STARTED_KEY)

    def clear(self) -> None:
        assert self.client is not None
        self.client.delete(STARTED_KEY)
        self.sent.clear()

    def programs(self) -> dict[str, list[psutil.Process]]:
        groups = {
            f"worker_{number:02d}": process_tree(process.pid)
            for number, process in enumerate(self.workers)
        }
        groups["redis"] = [self.redis.psutil_process()]
        return groups


class PlainDramatiq(BaselineSystem):
    """``dramatiq bench.baseline_dramatiq --processes 1 --threads 1``, twice."""

    name = "Dramatiq"

    def start(self) -> None:
        from bench import baseline_dramatiq

        self.actor = baseline_dramatiq.declare(self.redis.url)
        super().start()

    def worker_command(self, number: int) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "bench.baseline_dramatiq"] + [
            "--processes", "1", "--threads", "1",
        ]  # fmt: skip

    def _send(self) -> str:
        tag = uuid.uuid4().hex
        self.actor.send(tag)
        return tag


class PlainCelery(BaselineSystem):
    """``celery worker --pool prefork --concurrency 1``, twice."""

    name = "Celery"

    def start(self) -> None:
        from bench import baseline_celery

        baseline_celery.app.conf.broker_url = self.redis.kombu_url
        self.task = baseline_celery.trivial_task
        super().start()

    def worker_env(self) -> dict[str, str]:
        return {**super().worker_env(), "BENCH_CELERY_BROKER": self.redis.kombu_url}

    def worker_command(self, number: int) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "bench.baseline_celery"] + [
            "worker", "--pool", "prefork", "--concurrency", "1",
            "--hostname", f"bench{number}@%h", "--loglevel", "WARNING",
        ]  # fmt: skip

    def _send(self) -> str:
        tag = uuid.uuid4().hex
        self.task.delay(tag)
        return tag


#: Task record fields read when a KSI task may have finished.
FINISHED_FIELDS = ["status", "started_at", "result", "worker_pid", "error"]


class KsiSystem(System):
    """A KSI bundle under supervisord whose ``claude`` is the instant fake."""

    name = "KSI"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__()
        self.bundle = Bundle(
            {
                "KSI_WORKERS": str(WORKERS),
                "KSI_WORKER_THREADS": "1",
                "KSI_CLAUDE_BIN": str(INSTANT_CLAUDE),
                "KSI_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                **(env or {}),
            }
        )
        self.client = None
        self.redis: redis.Redis | None = None
        self.cursor: bytes = b"0-0"
        self.completed = 0
        self._programs: dict[str, list[psutil.Process]] | None = None

    def start(self) -> None:
        self.bundle.start()
        self.client = self.bundle.client()
        self.redis = self.bundle.redis()
        self.warm_up()

    def stop(self) -> list[str]:
        if self.client is not None:
            self.client.close()
        left = self.bundle.stop()
        self.bundle.cleanup()
        return left

    def _send(self) -> str:
        assert self.client is not None
        return self.client.request("QUEUE_TASK", prompt=PROMPT.decode())["task_id"]

    def send_many(self, count: int) -> list[str]:
        """Send ``count`` QUEUE_TASK requests on one connection without waiting.

        A thread writes the requests while this one reads the replies, so the
        daemon, not the round trip of each request, sets the pace.
        """
        lines = [
            json.dumps(
                {
                    "id": n,
                    "command": "QUEUE_TASK",
                    "params": {"prompt": PROMPT.decode()},
                }
            ).encode()
            + b"\n"
            for n in range(count)
        ]
        sent_at: list[float] = [0.0] * count
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.bundle.home / "run" / "ksi.sock"))

        def write() -> None:
            for n, line in enumerate(lines):
                sent_at[n] = time.time()
                conn.sendall(line)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        tags = []
        with conn, conn.makefile("rb") as replies:
            for _ in range(count):
                reply = json.loads(replies.readline())
                if reply.get("status") != "ok":
                    raise RuntimeError(f"QUEUE_TASK failed: {reply}")
                tag = reply["result"]["task_id"]
                self.sent[tag] = sent_at[reply["id"]]
                tags.append(tag)
        writer.join()
        return tags

    def _finished(self, tags: list[str]) -> dict[str, Timing]:
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.hmget(keys.task(tag), FINISHED_FIELDS)
        found = {}
        for tag, values in zip(tags, pipe.execute(), strict=True):
            status, started_at, result, worker, error = (
                json.loads(value) if value else None for value in values
            )
            if status == "succeeded":
                found[tag] = Timing(
                    self.sent[tag], float(started_at), float(result), int(worker)
                )
            elif status in ("failed", "timed_out", "cancelled", "retrying"):
                raise RuntimeError(f"KSI task {tag} is {status}: {error!r}")
        return found

    def clear(self) -> None:
        assert self.redis is not None
        last = self.redis.xrevrange(keys.EVENT_STREAM, count=1)
        self.cursor = last[0][0] if last else b"0-0"
        self.completed = 0
        self.sent.clear()

    def finished_count(self) -> int:
        assert self.redis is not None
        replies = self.redis.xread({keys.EVENT_STREAM: self.cursor}, count=100_000)
        for _, entries in replies:
            for entry_id, fields in entries:
                self.cursor = entry_id
                event_type = fields.get(b"event_type")
                if event_type == b"TASK_COMPLETED":
                    self.completed += 1
                elif event_type in (b"TASK_FAILED", b"TASK_RETRYING"):
                    raise RuntimeError(f"a KSI task failed: {fields!r}")
        return self.completed

    def programs(self) -> dict[str, list[psutil.Process]]:
        # A supervisorctl call takes most of a second, and no program of the
        # bundle restarts during a benchmark, so the first result is cached.
        if self._programs is None:
            self._programs = self._read_programs()
        return self._programs

    def _read_programs(self) -> dict[str, list[psutil.Process]]:
        groups = {}
        for line in self.bundle.ctl("status").stdout.splitlines():
            parts = line.replace(",", " ").split()
            if len(parts) >= 4 and parts[1] == "RUNNING" and parts[2] == "pid":
                groups[parts[0].removeprefix("ksi:")] = process_tree(int(parts[3]))
        pid = self.bundle.supervisord_pid()
        if pid is not None:
            groups["supervisord"] = [psutil.Process(pid)]
        return groups
