"""``ksi-supervisord`` and ``ksi-supervisorctl``: run supervisor on the bundle.

``deploy/supervisord.conf`` reads its paths and counts from environment
variables (``%(ENV_KSI_HOME)s`` and others), which supervisor cannot default.
These entry points resolve the bundle's settings with their defaults, export
them, create the runtime folders, and exec the supervisor program.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from .metrics_files import remove_stale_files
from .settings import PROJECT_ROOT, Settings, SettingsError, redis_password_file

CONFIG = PROJECT_ROOT / "deploy" / "supervisord.conf"


def bundle_environment(settings: Settings) -> dict[str, str]:
    """Return the variables that supervisord.conf and every program read."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        path = os.pathsep.join([venv_bin, path])
    return {
        "PATH": path,
        "KSI_HOME": str(settings.home),
        "KSI_WORKERS": str(settings.workers),
        "KSI_WORKER_THREADS": str(settings.worker_threads),
        "KSI_CLAUDE_BIN": settings.claude_bin,
        "KSI_QUEUE": settings.queue,
        "KSI_WORKER_POLL_MS": str(settings.worker_poll_ms),
        "KSI_STOP_WAIT_S": str(settings.stop_wait_s),
        # Dramatiq's own shutdown timeout, a little inside supervisord's
        # window so the worker exits before SIGKILL.
        "KSI_STOP_WAIT_MS": str(max(1, settings.stop_wait_s - 3) * 1000),
        # Redis outlives the workers' drain (see ksi_worker.redis_guard).
        "KSI_REDIS_STOP_WAIT_S": str(settings.stop_wait_s + 30),
        "KSI_PYTHON": sys.executable,
        # Every program records metrics here for the metrics program to sum.
        "PROMETHEUS_MULTIPROC_DIR": str(settings.prometheus_dir),
        "KSI_STUB_AUTOSTART": os.environ.get("KSI_STUB_AUTOSTART") or "false",
        "KSI_STUB_PORT": os.environ.get("KSI_STUB_PORT") or "0",
    }


def make_runtime_folders(settings: Settings) -> None:
    for folder in (
        settings.home,
        settings.run_dir,
        settings.log_dir,
        settings.home / "redis",
        settings.home / "secrets",
        settings.tasks_dir,
        settings.prometheus_dir,
    ):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_redis_password(settings.home)


def make_redis_password(home: Path) -> None:
    """Create the Redis password and the config file that sets it, once.

    redis-server reads the password from ``secrets/redis-auth.conf`` through
    ``--include``, so it never appears in a process list or a log.
    """
    password_file = redis_password_file(home)
    auth_conf = home / "secrets" / "redis-auth.conf"
    if not password_file.exists():
        _write_private(password_file, secrets.token_hex(32) + "\n")
    if not auth_conf.exists():
        password = password_file.read_text().strip()
        _write_private(auth_conf, f"requirepass {password}\n")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only its owner can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def describe_home_error(home: Path, error: OSError) -> str:
    """Say why KSI_HOME cannot hold the runtime folders, and how to fix it."""
    path = error.filename or home
    if isinstance(error, FileExistsError):
        problem = f"{path} is a file where a folder is needed; remove or move it"
    elif isinstance(error, NotADirectoryError):
        problem = f"a part of {path} is a file, not a folder"
    else:
        problem = f"cannot write {path} ({error.strerror})"
    return (
        f"KSI_HOME={home} cannot be used: {problem}. Set KSI_HOME to a folder "
        "that this user can write."
    )


def _exec(program: str, args: list[str]) -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"{program}: invalid setting: {error}")
    try:
        make_runtime_folders(settings)
        if program == "supervisord":
            # Metrics of an earlier run are stale only while no program runs.
            remove_stale_files(
                settings.prometheus_dir,
                supervisord_pidfile=settings.run_dir / "supervisord.pid",
            )
    except OSError as error:
        sys.exit(f"ksi-{program}: {describe_home_error(settings.home, error)}")
    os.environ.update(bundle_environment(settings))
    argv = [program, "-c", str(CONFIG), *args]
    os.execvp(os.path.join(os.path.dirname(sys.executable), program), argv)


def supervisord_main() -> None:
    _exec("supervisord", sys.argv[1:])


def supervisorctl_main() -> None:
    _exec("supervisorctl", sys.argv[1:])
