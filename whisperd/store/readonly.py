"""Read-only connections to the job store, for the reading commands.

`whisperd status` and `whisperd jobs` are run by group members who drop files
and may only read the 0750 state folder: they must never create the database,
switch its journal mode, or migrate it. This module builds an engine that
cannot write; JobStore.open_read_only checks the schema through it.
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from whisperd.errors import WhisperdError

# Milliseconds a reader waits on a lock held by a writer (a checkpoint).
_READER_BUSY_TIMEOUT_MS = 5_000


def _sqlite_uri(path: str, *, immutable: bool) -> str:
    return f"file:{quote(path)}?mode=ro" + ("&immutable=1" if immutable else "")


def _connect_sqlite(path: str) -> sqlite3.Connection:
    """Open `path` read-only. A WAL database whose -wal/-shm files are absent
    (no daemon has it open) and whose folder the caller cannot write cannot be
    opened with mode=ro alone; with no -wal file there is nothing but the main
    file to read, so it is opened as immutable then."""
    try:
        conn = sqlite3.connect(_sqlite_uri(path, immutable=False), uri=True, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        if os.path.exists(path + "-wal"):
            raise
        conn = sqlite3.connect(_sqlite_uri(path, immutable=True), uri=True, check_same_thread=False)
    conn.isolation_level = None  # autocommit reads: nothing to roll back
    conn.execute(f"PRAGMA busy_timeout={_READER_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only=ON")
    return conn


def read_only_engine(url: URL) -> Engine:
    """An engine on `url` that cannot write; a missing SQLite file is an error
    naming it (never an empty store made in its place)."""
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True).execution_options(postgresql_readonly=True)
    path = os.path.abspath(url.database or "")
    if not url.database or not os.path.isfile(path):
        raise WhisperdError(
            f"{path}: no job store there (the daemon creates it at its first start; "
            "check --config and [daemon] database_url)"
        )
    if not os.access(path, os.R_OK):
        raise WhisperdError(f"{path}: cannot read the job store (permission denied)")
    engine = sa.create_engine("sqlite://", creator=lambda: _connect_sqlite(path))
    # One snapshot per read transaction (a deferred BEGIN never takes the write lock).
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    return engine


def check_schema_version(version: int | None, known: int, where: str) -> None:
    """Refuse a store this whisperd cannot read as it is (reading never migrates)."""
    if version is None:
        raise WhisperdError(f"{where}: not a whisperd job store (no schema version)")
    if version > known:
        raise WhisperdError(
            f"{where}: database schema v{version} is newer than this whisperd (v{known}); upgrade whisperd"
        )
    if version < known:
        raise WhisperdError(
            f"{where}: database schema v{version} is older than this whisperd (v{known}); "
            "start the daemon once to upgrade it"
        )
