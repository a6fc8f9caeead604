"""What the running daemon tells systemd between READY=1 and STOPPING=1:
the keep-alive (WATCHDOG=1, only while every worker is alive), more start
time while the store is unreachable at start, more stop time while running
jobs drain, and a STATUS= line while it waits for the store.
"""

from __future__ import annotations

from collections.abc import Callable

from whisperd.daemon.sdnotify import Notifier
from whisperd.workers.pool import WorkerPool

# While running jobs drain on stop, ask systemd for more time at most this
# often, each time for what is left of the grace period plus the margin.
EXTEND_TIMEOUT_EVERY_SECONDS = 1.0
EXTEND_TIMEOUT_MARGIN_SECONDS = 5.0


class ServiceNotices:
    """The loop calls keep_alive; the pool while_draining; any thread that
    waits for the store on_store_wait."""

    def __init__(
        self,
        notifier: Notifier,
        clock: Callable[[], float],
        *,
        watchdog_every: float,
        busy_timeout: Callable[[], float],
        pool: Callable[[], WorkerPool | None],
    ) -> None:
        self._notifier = notifier
        self._clock = clock
        self._watchdog_every = watchdog_every
        self._next_watchdog = 0.0
        self._last_extend = float("-inf")
        # The database's busy timeout now (a store wait at start lasts up to it more).
        self._busy_timeout = busy_timeout
        self._pool = pool
        # Set once READY=1 is sent: a store wait before it asks for more start time.
        self.ready = False

    def keep_alive(self, now: float, pool: WorkerPool) -> None:
        """WATCHDOG=1 every watchdog_every seconds, only while every worker
        is alive: a pool that cannot keep its workers up lets systemd step in."""
        if now < self._next_watchdog or pool.alive_count() != pool.size():
            return
        self._next_watchdog = now + self._watchdog_every
        self._notifier.watchdog()

    def while_draining(self, remaining: float) -> None:
        """Called by the pool every 0.1 s while running jobs finish."""
        now = self._clock()
        if now - self._last_extend >= EXTEND_TIMEOUT_EVERY_SECONDS:
            self._last_extend = now
            self._notifier.extend_timeout(remaining + EXTEND_TIMEOUT_MARGIN_SECONDS)

    def on_store_wait(self, reason: str, delay: float) -> None:
        """Before each wait for an unreachable store (any thread): tell systemd
        we are waiting, not stuck; at start, ask for more start time."""
        self._notifier.status(f"store unreachable: {reason}; retrying")
        pool = self._pool()
        if not self.ready:
            self._notifier.extend_timeout(delay + self._busy_timeout() + EXTEND_TIMEOUT_MARGIN_SECONDS)
        elif pool is not None and pool.alive_count() == pool.size():
            self._notifier.watchdog()
