"""``ksi-supervisord`` and ``ksi-supervisorctl``: run supervisor on the bundle.

``deploy/supervisord.conf`` reads its paths and counts from environment
variables (``%(ENV_KSI_HOME)s`` and others), which supervisor cannot default.
These entry points resolve the bundle's settings with their defaults, export
them, create the runtime folders, and exec the supervisor program.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .settings import PROJECT_ROOT, Settings, SettingsError

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
        "KSI_REDIS_URL": settings.redis_url,
        "KSI_WORKERS": str(settings.workers),
        "KSI_WORKER_THREADS": str(settings.worker_threads),
        "KSI_CLAUDE_BIN": settings.claude_bin,
        "KSI_QUEUE": settings.queue,
        "KSI_WORKER_POLL_MS": str(settings.worker_poll_ms),
        "KSI_STOP_WAIT_S": str(settings.stop_wait_s),
        # Dramatiq's own shutdown timeout, a little inside supervisord's
        # window so the worker exits before SIGKILL.
        "KSI_STOP_WAIT_MS": str(max(1, settings.stop_wait_s - 3) * 1000),
        "KSI_PYTHON": sys.executable,
        "KSI_STUB_AUTOSTART": os.environ.get("KSI_STUB_AUTOSTART") or "false",
        "KSI_STUB_PORT": os.environ.get("KSI_STUB_PORT") or "0",
    }


def make_runtime_folders(settings: Settings) -> None:
    for folder in (
        settings.home,
        settings.run_dir,
        settings.log_dir,
        settings.home / "redis",
        settings.tasks_dir,
    ):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def _exec(program: str, args: list[str]) -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"{program}: invalid setting: {error}")
    make_runtime_folders(settings)
    os.environ.update(bundle_environment(settings))
    argv = [program, "-c", str(CONFIG), *args]
    os.execvp(os.path.join(os.path.dirname(sys.executable), program), argv)


def supervisord_main() -> None:
    _exec("supervisord", sys.argv[1:])


def supervisorctl_main() -> None:
    _exec("supervisorctl", sys.argv[1:])
