"""Part of the job store: what every verb of it stands on.

StoreBase opens the store (URL, engine, migrations; or read-only), holds
its engine and health, and gives the verbs their transactions: a write
(BEGIN IMMEDIATE on SQLite), a write again after a lost insert race, a read,
an outage waited out with backoff, and the fenced update of a running job
that every end of an attempt passes through. The mixins of JobStore
(store/job_store.py) inherit it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from whisperd.errors import StoreUnavailable, WhisperdError
from whisperd.jobs import Job, JobState
from whisperd.store import hooks as store_hooks
from whisperd.store import notify as store_notify
from whisperd.store.database import (
    _READ_ONLY_OPTION,
    SQLITE_BUSY_TIMEOUT_MS,
    _apply_migrations,
    _create_engine,
    _display_url,
    _normalise_url,
)
from whisperd.store.notify import StoreListener, StoreNotice
from whisperd.store.outage import RetryPolicy, StoreHealth, outage_reason
from whisperd.store.rows import _attempt_ended, _job_from_row
from whisperd.store.schema import JOBS, MIGRATIONS, SCHEMA_TABLE, Migration

# Attempts at a write that lost an insert race on a unique index (PostgreSQL).
INSERT_RACE_RETRIES = 3

_T = TypeVar("_T")
_S = TypeVar("_S", bound="StoreBase")
_P = ParamSpec("_P")


def outage_retried(verb: Callable[Concatenate[_S, _P], _T]) -> Callable[Concatenate[_S, _P], _T]:
    """Marks a store verb whose one transaction is run again while the store
    is unreachable (StoreBase._with_retry: backoff until it answers, the
    daemon stops, or the caller asked to fail fast). A verb is retried only
    where it says so; a verb that calls another retried verb is not itself
    retried, so nothing is retried twice."""

    @functools.wraps(verb)
    def call(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._with_retry(lambda: verb(self, *args, **kwargs))

    return call


class StoreBase:
    """The job store's connection and transactions; the verbs live in the mixins."""

    def __init__(
        self,
        engine: Engine,
        where: str,
        *,
        retry: RetryPolicy | None = None,
        health: StoreHealth | None = None,
    ) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**{_READ_ONLY_OPTION: True})
        self._where = where
        self._retry = retry
        self._health = health or StoreHealth(where)
        self._fail_fast = threading.local()

    @classmethod
    def open(
        cls: type[_S],
        url: str,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout_seconds: float = SQLITE_BUSY_TIMEOUT_MS / 1000,
        retry: RetryPolicy | None = None,
    ) -> _S:
        """Connect and bring the schema up to date.

        url: ``sqlite:////abs/path/jobs.db`` or ``postgresql+psycopg://user@host/db``.
        migrations: the schema history; tests pass a longer one to check upgrades.
        busy_timeout_seconds: how long an SQLite writer waits for the write lock.
        retry: wait out outages (here and in every call) instead of raising
        StoreUnavailable.
        """
        parsed = _normalise_url(url)
        where = _display_url(parsed)
        engine = _create_engine(parsed, max(1, int(busy_timeout_seconds * 1000)))
        store = cls(engine, where, retry=retry)
        try:
            store._with_retry(lambda: store._migrate(migrations))
        except StoreUnavailable as exc:
            engine.dispose()
            raise StoreUnavailable(where, exc.reason, "cannot open the job store: ") from exc
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise WhisperdError(f"{where}: cannot open the job store: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return store

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        with self._engine.begin() as conn:
            _apply_migrations(conn, migrations, self._where)

    @property
    def health(self) -> StoreHealth:
        """Up/down state of this store as seen by this process."""
        return self._health

    @contextmanager
    def failing_fast(self) -> Iterator[None]:
        """In this thread, raise StoreUnavailable at once instead of waiting out
        an outage (a metrics scrape or a heartbeat must not hang on the store)."""
        before = getattr(self._fail_fast, "on", False)
        self._fail_fast.on = True
        try:
            yield
        finally:
            self._fail_fast.on = before

    def _with_retry(self, call: Callable[[], _T]) -> _T:
        """Run `call`; while it fails because the store is unreachable, back off
        and run it again (every call is one transaction, so a rerun is safe)."""
        backoff = None if self._retry is None else self._retry.delays()
        while True:
            try:
                result = call()
            except sa.exc.DBAPIError as exc:
                reason = outage_reason(exc)
                if reason is None:
                    raise
                self._health.failed(reason)
                policy = self._retry
                fail_fast = getattr(self._fail_fast, "on", False)
                if policy is None or backoff is None or policy.stop.is_set() or fail_fast:
                    raise StoreUnavailable(self._where, reason) from exc
                delay = backoff.next()
                if policy.on_wait is not None:
                    policy.on_wait(reason, delay)
                policy.pause(delay)
            else:
                return result

    @classmethod
    def open_read_only(cls: type[_S], url: str, *, migrations: Sequence[Migration] = MIGRATIONS) -> _S:
        """Connect for reading only (status, jobs): never creates the database,
        never migrates; a missing store or another schema version is an error."""
        from whisperd.store.readonly import check_schema_version, read_only_engine

        parsed = _normalise_url(url)
        where = _display_url(parsed)
        engine = read_only_engine(parsed)
        try:
            with engine.begin() as conn:
                if not sa.inspect(conn).has_table(SCHEMA_TABLE.name):
                    version = None
                else:
                    version = conn.execute(sa.select(sa.func.max(SCHEMA_TABLE.c.version))).scalar()
            check_schema_version(version, len(migrations), where)
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise WhisperdError(f"{where}: cannot open the job store: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, where)

    def close(self) -> None:
        self._engine.dispose()

    def listener(self, on_notice: Callable[[StoreNotice], None]) -> StoreListener | None:
        """A listener for this store's wake-ups (store/notify.py), not yet
        started; None where the store sends none (SQLite)."""
        if self._engine.dialect.name != "postgresql":
            return None
        return StoreListener(store_notify.libpq_url(self._engine.url), self._where, on_notice)

    @property
    def where(self) -> str:
        """The database URL, password hidden (for messages and logs)."""
        return self._where

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn
        # A committed write ends an outage (SQLite still serves reads while
        # another process holds the write lock, so a read proves nothing).
        self._health.succeeded()

    def _write_racing_inserts(self, write: Callable[[Connection], _T]) -> _T:
        """Run `write` in a write transaction, again if it lost an insert race:
        on PostgreSQL two hosts can both find no row and both insert; the loser
        gets a unique violation, and its second look finds the winner's row."""
        for attempt in range(INSERT_RACE_RETRIES):
            try:
                with self._writing() as conn:
                    return write(conn)
            except sa.exc.IntegrityError:
                if attempt == INSERT_RACE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._reader.begin() as conn:
            yield conn

    @staticmethod
    def _fetch(conn: Connection, job_id: int) -> Job | None:
        row = conn.execute(sa.select(JOBS).where(JOBS.c.id == job_id)).first()
        return None if row is None else _job_from_row(row)

    @staticmethod
    def _fenced_update(conn: Connection, job_id: int, token: str, values: dict[str, Any]) -> bool:
        """Update a running job only while `token` still holds its claim; it stays running."""
        result = conn.execute(
            JOBS.update()
            .where(
                JOBS.c.id == job_id,
                JOBS.c.claim_token == token,
                JOBS.c.state == JobState.RUNNING.value,
            )
            .values(**values)
        )
        return result.rowcount == 1

    @classmethod
    def _fenced_end(cls, conn: Connection, job_id: int, token: str, values: dict[str, Any]) -> bool:
        """End a running job's attempt while `token` still holds its claim:
        the fenced update to its next state (`values["state"]`, never running:
        jobs.state_after_attempt), the attempt's
        record closed, and the hook deliveries its end owes recorded, all in
        the caller's transaction (every end of a running job passes here)."""
        if not cls._fenced_update(conn, job_id, token, values):
            return False
        _attempt_ended(conn, job_id, token, values)
        store_hooks.record_job_end(conn, JOBS, job_id, values["state"], values.get("updated_at", time.time()))
        return True

    def _select_jobs(self, query: sa.Select[Any]) -> list[Job]:
        with self._reading() as conn:
            return [_job_from_row(row) for row in conn.execute(query).all()]
