"""Graceful worker shutdown: let running tasks finish, then hand them back.

Dramatiq's ShutdownNotifications raises in the thread of an actor declared
with ``notify_shutdown`` at the first SIGTERM, which would cut every task
short, so the actor does not ask for it. Instead, this middleware records when
shutdown began. The runner stops a task that is still running after the drain
window, ``KSI_STOP_WAIT_S`` less the kill grace and a margin. Then the task's
tree is killed and its message goes back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time

from dramatiq import Middleware

logger = logging.getLogger(__name__)


class ShutdownDrain(Middleware):
    """Tell running tasks when the worker's drain window has run out.

    Parameters:
      drain_s: Seconds that running tasks may keep running after SIGTERM.
    """

    def __init__(self, *, drain_s: float) -> None:
        self.drain_s = drain_s
        self._lock = threading.Lock()
        self._deadline: float | None = None

    def before_worker_shutdown(self, broker, worker) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.drain_s
        logger.info(
            "Worker shutdown: running tasks have %.0f s to finish before they "
            "are handed back to the queue.",
            self.drain_s,
        )

    def drain_expired(self) -> bool:
        with self._lock:
            return self._deadline is not None and time.monotonic() >= self._deadline
