"""Riding out job store outages.

The one place that decides whether a database error means "the store is not
reachable right now" (a writer holding SQLite's lock past the busy timeout, a
PostgreSQL server restarting or refusing connections, a connection terminated
under us) rather than a bug or bad data, and the shared state that reports an
outage once when it starts and once when it ends.

JobStore retries a call that failed this way with capped exponential backoff
(RetryPolicy); without a policy, or when its stop event is set, the call
raises StoreUnavailable so a command line says "store unreachable: ..." and
exits instead of printing a traceback.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa
import structlog

log = structlog.get_logger("whisperd.store")

# How often a wait for the store looks at its stop flag.
_STOP_POLL_SECONDS = 0.1

# SQLite messages that mean another process holds a lock, not a broken database.
_SQLITE_TRANSIENT = (
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "unable to open database file",
    "disk i/o error",
)


def outage_reason(exc: BaseException) -> str | None:
    """Why the store is unreachable, if `exc` says so; None for any other error
    (constraint violations, missing tables, bad SQL are bugs: never retried)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    if exc.connection_invalidated:
        return reason
    if not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return None
    module = type(exc.orig).__module__
    if module.startswith("sqlite3"):
        return reason if any(text in reason.lower() for text in _SQLITE_TRANSIENT) else None
    # psycopg's OperationalError/InterfaceError: connection refused, admin
    # shutdown, server closed the connection, too many clients...
    return reason


class StopFlag(Protocol):
    """threading.Event, or the worker's shared-memory Flag."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How a JobStore waits out an outage.

    stop: once set, a failing call raises StoreUnavailable instead of waiting
    (shutdown). on_wait: called before every wait (keep systemd informed).
    """

    stop: StopFlag
    first_delay_seconds: float = 0.2
    max_delay_seconds: float = 5.0
    on_wait: Callable[[str, float], None] | None = None

    def delays(self) -> _Backoff:
        return _Backoff(self.first_delay_seconds, self.max_delay_seconds)

    def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less once stop is set (polled: a Flag cannot be waited on)."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _STOP_POLL_SECONDS))


class _Backoff:
    def __init__(self, first: float, cap: float) -> None:
        self._next = first
        self._cap = cap

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay


class StoreHealth:
    """Whether the store answered the last call, shared by every thread of a
    process. Logs `store.unreachable` once per outage and `store.reachable`
    with the outage's duration when it is back; listeners (metrics) are told
    of each change and each failed call."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._reason = ""
        self._errors = 0
        self._on_change: list[Callable[[bool], None]] = []
        self._on_error: list[Callable[[], None]] = []

    def listen(self, *, on_change: Callable[[bool], None], on_error: Callable[[], None]) -> None:
        with self._lock:
            self._on_change.append(on_change)
            self._on_error.append(on_error)

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def errors(self) -> int:
        return self._errors

    def failed(self, reason: str) -> None:
        with self._lock:
            self._errors += 1
            self._reason = reason
            started = self._down_since is None
            if started:
                self._down_since = time.monotonic()
            on_error, on_change = list(self._on_error), list(self._on_change)
        if started:
            log.error(
                "store.unreachable",
                store=self._where,
                reason=reason,
                pid=os.getpid(),
                hint="retrying with backoff",
            )
        for listener in on_error:
            listener()
        if started:
            for changed in on_change:
                changed(False)

    def succeeded(self) -> None:
        if self._down_since is None:  # the common case: no lock taken
            return
        with self._lock:
            since: float | None = self._down_since
            self._down_since = None
            on_change = list(self._on_change)
        if since is None:  # another thread saw the store back first
            return
        outage = round(time.monotonic() - since, 1)
        log.warning("store.reachable", store=self._where, outage_seconds=outage, pid=os.getpid())
        for changed in on_change:
            changed(True)
