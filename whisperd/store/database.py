"""Part of the job store: the database connection itself.

A database URL checked and shown without its password; the SQLite file's
folder, its pragmas and the BEGIN IMMEDIATE every write starts with; the
engine; the database server's clock that leases are judged by; and the
migrations applied inside the transaction that opens the store.

SQLite notes: the file must be on a local file system (WAL needs shared
memory); every write transaction starts with BEGIN IMMEDIATE so concurrent
writers queue on the busy timeout instead of failing with "database is locked"
when a read lock would have to be upgraded half-way through a transaction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry

from whisperd.errors import WhisperdError
from whisperd.store.schema import SCHEMA_TABLE, Migration

# How long (ms) an SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key that serialises schema migrations between processes/hosts.
PG_MIGRATION_LOCK_KEY = 0x77685F7364  # "wh_sd"

# Execution option marking a read-only transaction (SQLite then starts a plain
# deferred BEGIN, which never waits for the write lock in WAL mode).
_READ_ONLY_OPTION = "whisperd_read_only"


class _DbEpoch(sa.sql.functions.FunctionElement[float]):
    """The database server's clock, in Unix seconds. Leases are set and
    judged by it, so a step of one host's wall clock neither reclaims live jobs
    nor keeps dead ones; every host of a shared database agrees on it."""

    type = sa.Float()
    inherit_cache = True


@compiles(_DbEpoch, "sqlite")
def _sqlite_epoch(_element: _DbEpoch, _compiler: Any, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(_DbEpoch, "postgresql")
def _postgresql_epoch(_element: _DbEpoch, _compiler: Any, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


def _lease_clock(now: float | None) -> Any:
    """`now` where a caller (a test) fixes the time, else the database's clock."""
    return _DbEpoch() if now is None else now


def _display_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _normalise_url(raw: str) -> URL:
    try:
        url = sa.make_url(raw)
    except sa.exc.ArgumentError as exc:
        raise WhisperdError(f"{raw}: not a database URL ({exc})") from exc
    backend = url.get_backend_name()
    if backend == "postgresql" and url.get_driver_name() != "psycopg":
        # psycopg 3 is the driver whisperd ships with; "postgresql://" means it too.
        url = url.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        raise WhisperdError(f"{_display_url(url)}: unsupported database (use sqlite:/// or postgresql://)")
    return url


def _prepare_sqlite_file(url: URL) -> None:
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file:"):
        raise WhisperdError(
            f"{_display_url(url)}: the job store must be an SQLite file shared by all workers, "
            "e.g. sqlite:////var/lib/whisperd/jobs.db"
        )
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise WhisperdError(f"{path}: cannot create the job store's folder: {exc.strerror}") from exc


def _on_sqlite_connect(
    dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry, busy_timeout_ms: int
) -> None:
    # Take transaction control away from pysqlite: _on_sqlite_begin emits BEGIN.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # busy_timeout first, so switching a fresh file to WAL waits for other openers.
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    # Before WAL, which writes the header of a new file: only a file that has
    # no header yet takes auto_vacuum (older files: JobStore.enable_incremental_vacuum).
    # Asked of an existing file it wants the write lock, so a new pooled
    # connection (a read included) would wait for another process's writer.
    if cursor.execute("PRAGMA page_count").fetchone()[0] == 0:
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    read_only = bool(conn.get_execution_options().get(_READ_ONLY_OPTION, False))
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _create_engine(url: URL, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> Engine:
    if url.get_backend_name() == "sqlite":
        _prepare_sqlite_file(url)
        engine = sa.create_engine(url)

        def on_connect(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
            _on_sqlite_connect(dbapi_conn, record, busy_timeout_ms)

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _apply_migrations(conn: Connection, migrations: Sequence[Migration], where: str) -> None:
    """Bring the schema up to len(migrations), in the caller's transaction."""
    if conn.dialect.name == "postgresql":
        # Two hosts opening a fresh database at once would both CREATE TABLE.
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_MIGRATION_LOCK_KEY)))
    SCHEMA_TABLE.create(conn, checkfirst=True)
    found = conn.execute(sa.select(sa.func.max(SCHEMA_TABLE.c.version))).scalar()
    if found is None:
        conn.execute(SCHEMA_TABLE.insert().values(version=0))
        found = 0
    known = len(migrations)
    if found > known:
        raise WhisperdError(
            f"{where}: database schema v{found} is newer than this whisperd (v{known}); upgrade whisperd"
        )
    for migration in migrations[found:]:
        migration(conn)
    if found < known:
        conn.execute(SCHEMA_TABLE.update().values(version=known))
