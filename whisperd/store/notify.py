"""Part of the job store: wake-ups on PostgreSQL.

The store NOTIFYs one channel inside the transaction that queues a job or
asks a running job to stop, so the notice goes out exactly when the change
is committed (and never for a change rolled back). Each daemon owns one
StoreListener: a thread with one connection of its own that LISTENs there
and hands every notice to the daemon. Notices only wake: a lost one (a
listener reconnecting, a restart of the server) costs a poll interval,
because workers and the pool still poll the store. SQLite has no NOTIFY;
there the poll is all there is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import URL, Connection

log = structlog.get_logger("whisperd.store")

CHANNEL = "whisperd_jobs"
QUEUED = "queued"
CANCEL = "cancel"
# How often the listener looks at its stop event between notices.
WAIT_SECONDS = 0.5
# After a lost connection, wait this long before connecting again.
RECONNECT_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class StoreNotice:
    """One wake-up from the store."""

    # QUEUED (a job of `inbox` can be claimed) or CANCEL (job `job_id` should stop).
    kind: str
    inbox: str = ""
    # 0 for QUEUED: one notice per inbox and transaction (PostgreSQL folds
    # identical payloads of one transaction into one).
    job_id: int = 0


def notify(conn: Connection, notice: StoreNotice) -> None:
    """Send `notice` when `conn`'s transaction commits (PostgreSQL only)."""
    if conn.dialect.name != "postgresql":
        return
    payload = json.dumps({"kind": notice.kind, "inbox": notice.inbox, "job_id": notice.job_id})
    conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))


def parse(payload: str) -> StoreNotice | None:
    """The notice in `payload`, None for one this version does not know."""
    try:
        fields: Any = json.loads(payload)
        return StoreNotice(kind=str(fields["kind"]), inbox=str(fields["inbox"]), job_id=int(fields["job_id"]))
    except (ValueError, TypeError, KeyError):
        return None


def libpq_url(url: URL) -> str:
    """The SQLAlchemy URL as psycopg's connect() takes it."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class StoreListener:
    """Owns one LISTEN connection and its thread (`whisperd-store-listener`);
    calls on_notice(notice) from that thread for every notice."""

    def __init__(self, conninfo: str, where: str, on_notice: Callable[[StoreNotice], None]) -> None:
        self._conninfo = conninfo
        self._where = where
        self._on_notice = on_notice
        self._stop = threading.Event()
        # Set while the connection LISTENs (notices sent before are not heard).
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="whisperd-store-listener")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)

    def wait_listening(self, timeout: float) -> bool:
        """Wait until the listener hears notices; False if it does not yet."""
        return self._listening.wait(timeout)

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                self._listen(psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5))
            except psycopg.Error as exc:
                log.warning(
                    "store.listen_failed",
                    where=self._where,
                    error=str(exc).strip(),
                    retry_in=RECONNECT_SECONDS,
                )
                self._stop.wait(RECONNECT_SECONDS)

    def _listen(self, conn: Any) -> None:
        with conn:
            conn.execute(f"LISTEN {CHANNEL}")
            log.info("store.listening", where=self._where, channel=CHANNEL)
            self._listening.set()
            try:
                self._deliver(conn)
            finally:
                self._listening.clear()

    def _deliver(self, conn: Any) -> None:
        while not self._stop.is_set():
            for message in conn.notifies(timeout=WAIT_SECONDS):
                notice = parse(message.payload)
                if notice is None:
                    continue
                try:
                    self._on_notice(notice)
                except Exception as exc:  # noqa: BLE001 - a wake-up gone wrong must not end the listening
                    log.warning("store.notice_failed", kind=notice.kind, error=str(exc))
