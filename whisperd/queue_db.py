"""The job store: the single source of truth about every job (layer L2).

One SQLAlchemy Core implementation serves SQLite (one host, several processes)
and PostgreSQL (several hosts). Every state change is a short transaction that
checks the state it expects (compare-and-set), so a job is claimed by one
worker at a time and every write by a worker is fenced by its claim token.

SQLite notes: the file must be on a local file system (WAL needs shared
memory); every write transaction starts with BEGIN IMMEDIATE so concurrent
writers queue on the busy timeout instead of failing with "database is locked"
when a read lock would have to be upgraded half-way through a transaction.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, Row
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from whisperd.errors import LeaseLost, WhisperdError
from whisperd.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Claim,
    FileIdentity,
    Job,
    JobSpec,
    JobState,
)

# A migration brings the schema up by one version inside the open() transaction.
Migration = Callable[[Connection], None]

# How long (ms) an SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Candidates looked at per claim; more than one only matters if a compare-and-set
# loses a race, which the row locks (PostgreSQL) and BEGIN IMMEDIATE (SQLite) prevent.
CLAIM_CANDIDATES = 8
# pg_advisory_xact_lock key that serialises schema migrations between processes/hosts.
PG_MIGRATION_LOCK_KEY = 0x77685F7364  # "wh_sd"
# Attempts at a write that lost an insert race on a unique index (PostgreSQL).
INSERT_RACE_RETRIES = 3

# Execution option marking a read-only transaction (SQLite then starts a plain
# deferred BEGIN, which never waits for the write lock in WAL mode).
_READ_ONLY_OPTION = "whisperd_read_only"
_ACTIVE_VALUES = [s.value for s in ACTIVE_STATES]
_UINT64 = 1 << 64
_INT64_MAX = (1 << 63) - 1
_T = TypeVar("_T")


# ---------------------------------------------------------------- schema v1 ---


def _define_v1(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The version 1 tables. Migration 1 creates exactly these; when a later
    version changes a table, migration 1 must keep using this definition."""
    jobs = sa.Table(
        "jobs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inbox", sa.Text, nullable=False),
        sa.Column("rel_path", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("file_device", sa.BigInteger, nullable=False),
        sa.Column("file_inode", sa.BigInteger, nullable=False),
        sa.Column("file_size", sa.BigInteger, nullable=False),
        sa.Column("file_mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("claim_token", sa.String(36)),
        sa.Column("worker", sa.Text),
        sa.Column("device", sa.Text),
        sa.Column("lease_expires", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("last_error", sa.Text),
        sa.Column("outputs_json", sa.Text, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("eta_seconds", sa.Float),
        sa.Column("audio_seconds", sa.Float),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    sa.Index("ix_jobs_claim", jobs.c.state, jobs.c.priority, jobs.c.not_before, jobs.c.id)
    # The identity rule: at most one queued-or-running job per file of an inbox.
    active = jobs.c.state.in_(_ACTIVE_VALUES)
    sa.Index(
        "ux_jobs_active_path",
        jobs.c.inbox,
        jobs.c.rel_path,
        unique=True,
        sqlite_where=active,
        postgresql_where=active,
    )
    sa.Index("ix_jobs_source", jobs.c.source)
    sa.Index("ix_jobs_inode", jobs.c.file_device, jobs.c.file_inode)
    sa.Index("ix_jobs_content", jobs.c.file_size, jobs.c.file_mtime_ns)
    sa.Index("ix_jobs_worker", jobs.c.worker, jobs.c.state)

    model_memory = sa.Table(
        "model_memory",
        metadata,
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("device_kind", sa.Text, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("measured_at", sa.Float, nullable=False),
    )
    return jobs, model_memory


def _migration_1_create_tables(conn: Connection) -> None:
    metadata = sa.MetaData()
    _define_v1(metadata)
    # checkfirst=False: a foreign "jobs" table in the database is an error, not ours to adopt.
    metadata.create_all(conn, checkfirst=False)


# Columns added by migration 2: where the source went after the job ended
# (done/, failed/, cancel/), and when. NULL disposed_at on a finished job means
# the move is still owed (a crash came between finishing and moving).
_V2_COLUMNS = (("disposed_at", sa.Float()), ("disposed_to", sa.Text()))


def _migration_2_source_disposal(conn: Connection) -> None:
    for name, type_ in _V2_COLUMNS:
        compiled = type_.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE jobs ADD COLUMN {name} {compiled}")
    # Jobs that ended before v2 had their sources moved already.
    conn.exec_driver_sql(
        "UPDATE jobs SET disposed_at = finished_at WHERE state IN ('done', 'failed', 'cancelled')"
    )


def _define_job_outputs(metadata: sa.MetaData) -> sa.Table:
    """One row per output path of a job, indexed by path: which source owns
    an output name is then one index look-up, however many jobs the store
    has kept (outputs_json stays the job's own record)."""
    job_outputs = sa.Table(
        "job_outputs",
        metadata,
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
    )
    sa.Index("ix_job_outputs_path", job_outputs.c.path)
    sa.Index("ix_job_outputs_job", job_outputs.c.job_id)
    return job_outputs


def _migration_3_output_index(conn: Connection) -> None:
    metadata = sa.MetaData()
    job_outputs = _define_job_outputs(metadata)
    metadata.create_all(conn, checkfirst=False)
    conn.exec_driver_sql("CREATE INDEX ix_jobs_undisposed ON jobs (state, disposed_at)")
    rows = conn.exec_driver_sql("SELECT id, outputs_json FROM jobs WHERE outputs_json <> '[]'").all()
    values = [{"job_id": job_id, "path": path} for job_id, text in rows for path in json.loads(text)]
    if values:
        conn.execute(job_outputs.insert(), values)


# Applied in order; the schema version is the number applied. Append, never edit.
MIGRATIONS: tuple[Migration, ...] = (
    _migration_1_create_tables,
    _migration_2_source_disposal,
    _migration_3_output_index,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The tables as the current code reads and writes them.
_METADATA = sa.MetaData()
JOBS, MODEL_MEMORY = _define_v1(_METADATA)
for _name, _type in _V2_COLUMNS:
    JOBS.append_column(sa.Column(_name, _type))
sa.Index("ix_jobs_undisposed", JOBS.c.state, JOBS.c.disposed_at)
JOB_OUTPUTS = _define_job_outputs(_METADATA)
SCHEMA_TABLE = sa.Table(
    "whisperd_schema",
    _METADATA,
    sa.Column("version", sa.Integer, nullable=False),
)


# ------------------------------------------------------------------- types ---


@dataclass(frozen=True, kw_only=True)
class HeartbeatReply:
    """What a worker learns from a heartbeat."""

    # False: the lease is lost (reclaimed, handed on); stop and write nothing.
    ok: bool
    # True: someone asked to cancel the job; stop at the next safe point.
    cancel_requested: bool


# ----------------------------------------------------------------- helpers ---


def _clock(now: float | None) -> float:
    return time.time() if now is None else now


def _to_int64(value: int) -> int:
    # st_ino/st_dev are unsigned 64-bit (overlayfs, NFS use the high bits);
    # BIGINT is signed, so store the same 64 bits as a signed number.
    return value - _UINT64 if value > _INT64_MAX else value


def _from_int64(value: int) -> int:
    return value + _UINT64 if value < 0 else value


def _retry_delay(attempts: int, base_delay: float, max_delay: float) -> float:
    """Exponential backoff with jitter so retried jobs do not stampede."""
    exponent = max(0, attempts - 1)
    return min(max_delay, base_delay * 2.0**exponent) * random.uniform(0.5, 1.5)


def _job_from_row(row: Row[Any]) -> Job:
    """The one place a stored row becomes a Job."""
    m = row._mapping
    return Job(
        id=int(m["id"]),
        spec=JobSpec.from_dict(json.loads(m["spec_json"])),
        identity=FileIdentity(
            device=_from_int64(int(m["file_device"])),
            inode=_from_int64(int(m["file_inode"])),
            size=int(m["file_size"]),
            mtime_ns=int(m["file_mtime_ns"]),
        ),
        state=JobState(m["state"]),
        attempts=int(m["attempts"]),
        max_attempts=int(m["max_attempts"]),
        not_before=float(m["not_before"]),
        claim_token=m["claim_token"],
        worker=m["worker"],
        device=m["device"],
        lease_expires=m["lease_expires"],
        created_at=float(m["created_at"]),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        last_error=m["last_error"],
        outputs=tuple(json.loads(m["outputs_json"])),
        progress=float(m["progress"]),
        eta_seconds=m["eta_seconds"],
        audio_seconds=m["audio_seconds"],
        cancel_requested=bool(m["cancel_requested"]),
        disposed_to=m.get("disposed_to"),
        disposed_at=m.get("disposed_at"),
    )


def _new_row(spec: JobSpec, identity: FileIdentity, now: float) -> dict[str, Any]:
    """Columns of a new job row, less its state and attempt limit."""
    return {
        "inbox": spec.inbox,
        "rel_path": spec.rel_path,
        "source": spec.source,
        "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
        "file_device": _to_int64(identity.device),
        "file_inode": _to_int64(identity.inode),
        "file_size": identity.size,
        "file_mtime_ns": identity.mtime_ns,
        "priority": spec.priority,
        "attempts": 0,
        "not_before": now,
        "created_at": now,
        "outputs_json": "[]",
        "progress": 0.0,
        "cancel_requested": False,
        "updated_at": now,
    }


def _record_outputs(conn: Connection, job_id: int, outputs: Sequence[str]) -> None:
    conn.execute(JOB_OUTPUTS.delete().where(JOB_OUTPUTS.c.job_id == job_id))
    if outputs:
        conn.execute(JOB_OUTPUTS.insert(), [{"job_id": job_id, "path": path} for path in outputs])


def _cleared_claim() -> dict[str, Any]:
    """Columns reset when a running job goes back to the queue."""
    return {"claim_token": None, "worker": None, "device": None, "lease_expires": None}


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


def _on_sqlite_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Take transaction control away from pysqlite: _on_sqlite_begin emits BEGIN.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # busy_timeout first, so switching a fresh file to WAL waits for other openers.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    read_only = bool(conn.get_execution_options().get(_READ_ONLY_OPTION, False))
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        _prepare_sqlite_file(url)
        engine = sa.create_engine(url)
        event.listen(engine, "connect", _on_sqlite_connect)
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


# ------------------------------------------------------------------- store ---


class JobStore:
    """Jobs in a database. Thread-safe; any number of processes and hosts may
    open the same database. Build with JobStore.open(url); close() when done."""

    def __init__(self, engine: Engine, where: str) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**{_READ_ONLY_OPTION: True})
        self._where = where

    @classmethod
    def open(cls, url: str, *, migrations: Sequence[Migration] = MIGRATIONS) -> JobStore:
        """Connect and bring the schema up to date.

        url: ``sqlite:////abs/path/jobs.db`` or ``postgresql+psycopg://user@host/db``.
        migrations: the schema history; tests pass a longer one to check upgrades.
        """
        parsed = _normalise_url(url)
        where = _display_url(parsed)
        engine = _create_engine(parsed)
        try:
            with engine.begin() as conn:
                _apply_migrations(conn, migrations, where)
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise WhisperdError(f"{where}: cannot open the job store: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, where)

    def close(self) -> None:
        self._engine.dispose()

    @property
    def where(self) -> str:
        """The database URL, password hidden (for messages and logs)."""
        return self._where

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

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
        """Update a running job only while `token` still holds its claim."""
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

    # -------------------------------------------------------------- enqueue ---

    def enqueue(
        self, spec: JobSpec, identity: FileIdentity, *, max_attempts: int, now: float | None = None
    ) -> tuple[Job, bool]:
        """Queue a job for spec's file unless one is already queued or running.

        Returns (job, True) for a new job, (the active job, False) otherwise,
        whatever that job's file identity is.
        """
        if max_attempts < 1:
            raise ValueError(f"{spec.source}: max_attempts must be at least 1, not {max_attempts}")
        moment = _clock(now)
        return self._write_racing_inserts(
            lambda conn: self._enqueue_in(conn, spec, identity, max_attempts, moment)
        )

    def enqueue_many(
        self,
        items: Sequence[tuple[JobSpec, FileIdentity]],
        *,
        max_attempts: int,
        now: float | None = None,
    ) -> list[tuple[Job, bool]]:
        """enqueue() for many files in one transaction: one commit (one fsync)
        instead of one per file, which is what bounds how fast a folder of
        2,000 dropped files becomes jobs. Returns enqueue()'s answer per item,
        in order; a file listed twice is queued once."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        moment = _clock(now)
        return self._write_racing_inserts(
            lambda conn: [
                self._enqueue_in(conn, spec, identity, max_attempts, moment) for spec, identity in items
            ]
        )

    def _enqueue_in(
        self, conn: Connection, spec: JobSpec, identity: FileIdentity, max_attempts: int, now: float
    ) -> tuple[Job, bool]:
        existing = conn.execute(
            sa.select(JOBS).where(
                JOBS.c.inbox == spec.inbox,
                JOBS.c.rel_path == spec.rel_path,
                JOBS.c.state.in_(_ACTIVE_VALUES),
            )
        ).first()
        if existing is not None:
            return _job_from_row(existing), False
        result = conn.execute(
            JOBS.insert().values(
                **_new_row(spec, identity, now), state=JobState.QUEUED.value, max_attempts=max_attempts
            )
        )
        job_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        job = None if job_id is None else self._fetch(conn, int(job_id))
        if job is None:
            raise WhisperdError(f"{self._where}: inserted job for {spec.source} cannot be read back")
        return job, True

    # ---------------------------------------------------------------- claim ---

    def claim(
        self,
        *,
        worker: str,
        device: str,
        lease_seconds: float,
        inboxes: Sequence[str] | None = None,
        now: float | None = None,
    ) -> Claim | None:
        """Take the best claimable job (priority first, then oldest) or None.

        The attempt is counted here, so a file that kills its worker every time
        still runs out of attempts.
        """
        if inboxes is not None and not inboxes:
            return None
        moment = _clock(now)
        query = (
            sa.select(JOBS.c.id)
            .where(
                JOBS.c.state == JobState.QUEUED.value,
                JOBS.c.not_before <= moment,
                JOBS.c.cancel_requested == sa.false(),
            )
            .order_by(JOBS.c.priority.desc(), JOBS.c.id.asc())
            .limit(CLAIM_CANDIDATES)
            # Other hosts skip rows we are looking at (nothing on SQLite, where
            # BEGIN IMMEDIATE already serialises claims).
            .with_for_update(skip_locked=True)
        )
        if inboxes is not None:
            query = query.where(JOBS.c.inbox.in_(list(inboxes)))
        with self._writing() as conn:
            for job_id in conn.execute(query).scalars().all():
                token = str(uuid.uuid4())
                taken = conn.execute(
                    JOBS.update()
                    .where(JOBS.c.id == job_id, JOBS.c.state == JobState.QUEUED.value)
                    .values(
                        state=JobState.RUNNING.value,
                        attempts=JOBS.c.attempts + 1,
                        claim_token=token,
                        worker=worker,
                        device=device,
                        started_at=moment,
                        finished_at=None,
                        lease_expires=moment + lease_seconds,
                        progress=0.0,
                        eta_seconds=None,
                        updated_at=moment,
                    )
                )
                if taken.rowcount == 1:
                    job = self._fetch(conn, job_id)
                    if job is not None:
                        return Claim(job=job, token=token)
        return None

    # ------------------------------------------------------- worker writes ---

    def heartbeat(
        self,
        job_id: int,
        token: str,
        *,
        lease_seconds: float,
        progress: float | None = None,
        eta_seconds: float | None = None,
        audio_seconds: float | None = None,
        now: float | None = None,
    ) -> HeartbeatReply:
        """Extend the lease and record progress; ok=False means the lease is lost."""
        moment = _clock(now)
        values: dict[str, Any] = {"lease_expires": moment + lease_seconds, "updated_at": moment}
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, progress))
        if eta_seconds is not None:
            values["eta_seconds"] = eta_seconds
        if audio_seconds is not None:
            values["audio_seconds"] = audio_seconds
        with self._writing() as conn:
            if not self._fenced_update(conn, job_id, token, values):
                return HeartbeatReply(ok=False, cancel_requested=False)
            cancel = conn.execute(sa.select(JOBS.c.cancel_requested).where(JOBS.c.id == job_id)).scalar()
        return HeartbeatReply(ok=True, cancel_requested=bool(cancel))

    def set_identity(
        self, job_id: int, token: str, identity: FileIdentity, *, now: float | None = None
    ) -> bool:
        """Record that a running job's source was replaced since it was queued
        (the worker transcribes the file as it is now)."""
        values = {
            "file_device": _to_int64(identity.device),
            "file_inode": _to_int64(identity.inode),
            "file_size": identity.size,
            "file_mtime_ns": identity.mtime_ns,
            "updated_at": _clock(now),
        }
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, values)

    def set_device(self, job_id: int, token: str, device: str, *, now: float | None = None) -> bool:
        """Record the device a running job really runs on (a CPU fallback)."""
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, {"device": device, "updated_at": _clock(now)})

    def set_outputs(
        self, job_id: int, token: str, outputs: Sequence[str], *, now: float | None = None
    ) -> bool:
        """Record the outputs a running job is about to write (so output_owner
        sees them before the job is done); False if the token no longer holds."""
        values = {"outputs_json": json.dumps(list(outputs)), "updated_at": _clock(now)}
        with self._writing() as conn:
            if not self._fenced_update(conn, job_id, token, values):
                return False
            _record_outputs(conn, job_id, outputs)
            return True

    def finish(
        self,
        job_id: int,
        token: str,
        *,
        state: JobState,
        outputs: Sequence[str] = (),
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """End a running job as done, failed or cancelled.

        False if the token no longer holds. Finishing again with the same token
        and state returns True and changes nothing (a worker may retry after a
        lost reply).
        """
        if state not in TERMINAL_STATES:
            raise ValueError(f"finish() needs a terminal state, not {state.value!r}")
        moment = _clock(now)
        values: dict[str, Any] = {
            "state": state.value,
            "finished_at": moment,
            "lease_expires": None,
            "last_error": error,
            "updated_at": moment,
        }
        # Outputs recorded earlier by set_outputs stay unless new ones are given.
        if outputs:
            values["outputs_json"] = json.dumps(list(outputs))
        if state is JobState.DONE:
            values["progress"] = 1.0
            values["eta_seconds"] = 0.0
        with self._writing() as conn:
            if self._fenced_update(conn, job_id, token, values):
                if outputs:
                    _record_outputs(conn, job_id, outputs)
                return True
            job = self._fetch(conn, job_id)
        return job is not None and job.claim_token == token and job.state is state

    def retry_or_fail(
        self,
        job_id: int,
        token: str,
        *,
        error: str,
        now: float | None = None,
        base_delay: float = 5.0,
        max_delay: float = 300.0,
    ) -> JobState:
        """Record a failed attempt: back to the queue after a backoff while
        attempts remain, else failed (cancelled if a cancel was asked for).

        Raises LeaseLost if the token no longer holds the job.
        """
        moment = _clock(now)
        with self._writing() as conn:
            job = self._fetch(conn, job_id)
            if job is None or job.claim_token != token or job.state is not JobState.RUNNING:
                raise LeaseLost(f"job {job_id}: lease lost before its failure could be recorded ({error})")
            new_state, values = self._after_failed_attempt(job, error, moment, base_delay, max_delay)
            if not self._fenced_update(conn, job_id, token, values):
                raise LeaseLost(f"job {job_id}: lease lost before its failure could be recorded ({error})")
        return new_state

    @staticmethod
    def _after_failed_attempt(
        job: Job, error: str, now: float, base_delay: float, max_delay: float
    ) -> tuple[JobState, dict[str, Any]]:
        ended = {"finished_at": now, "lease_expires": None, "last_error": error, "updated_at": now}
        if job.cancel_requested:
            return JobState.CANCELLED, {**ended, "state": JobState.CANCELLED.value}
        if job.attempts >= job.max_attempts:
            return JobState.FAILED, {**ended, "state": JobState.FAILED.value}
        not_before = now + _retry_delay(job.attempts, base_delay, max_delay)
        return JobState.QUEUED, {
            **_cleared_claim(),
            "state": JobState.QUEUED.value,
            "not_before": not_before,
            "last_error": error,
            "updated_at": now,
        }

    def release(self, job_id: int, token: str, *, reason: str, now: float | None = None) -> bool:
        """Give a running job back to the queue without counting the attempt
        (graceful shutdown, drained device). A job whose cancel was asked for
        ends cancelled instead. False if the token no longer holds."""
        moment = _clock(now)
        with self._writing() as conn:
            job = self._fetch(conn, job_id)
            if job is None or job.claim_token != token or job.state is not JobState.RUNNING:
                return False
            if job.cancel_requested:
                values = {"state": JobState.CANCELLED.value, "finished_at": moment, "lease_expires": None}
            else:
                values = {
                    **_cleared_claim(),
                    "state": JobState.QUEUED.value,
                    "attempts": max(0, job.attempts - 1),
                    "not_before": moment,
                    "last_error": reason,
                }
            return self._fenced_update(conn, job_id, token, {**values, "updated_at": moment})

    def cancel_running(self, job_id: int, token: str, *, reason: str, now: float | None = None) -> bool:
        """End a running job as cancelled (the pool, after killing its worker)."""
        moment = _clock(now)
        values = {
            "state": JobState.CANCELLED.value,
            "finished_at": moment,
            "lease_expires": None,
            "last_error": reason,
            "updated_at": moment,
        }
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, values)

    # ------------------------------------------------------ supervision ---

    def reclaim_stale(self, *, now: float | None = None) -> list[Job]:
        """Running jobs whose lease ran out (their worker died or hung): back to
        the queue, or failed once out of attempts, or cancelled if asked.
        Returns the jobs as they are afterwards."""
        moment = _clock(now)
        query = (
            sa.select(JOBS)
            .where(JOBS.c.state == JobState.RUNNING.value, JOBS.c.lease_expires < moment)
            .order_by(JOBS.c.id)
            .with_for_update(skip_locked=True)
        )
        reclaimed: list[Job] = []
        with self._writing() as conn:
            for row in conn.execute(query).all():
                job = _job_from_row(row)
                assert job.claim_token is not None  # running jobs always hold a token
                values = {**self._after_lease_expired(job, moment), "updated_at": moment}
                if self._fenced_update(conn, job.id, job.claim_token, values):
                    after = self._fetch(conn, job.id)
                    if after is not None:
                        reclaimed.append(after)
        return reclaimed

    @staticmethod
    def _after_lease_expired(job: Job, now: float) -> dict[str, Any]:
        ended = {"finished_at": now, "lease_expires": None}
        if job.cancel_requested:
            return {**ended, "state": JobState.CANCELLED.value}
        if job.attempts >= job.max_attempts:
            message = f"worker died {job.attempts} times on this file (last: {job.worker})"
            return {**ended, "state": JobState.FAILED.value, "last_error": message}
        return {
            **_cleared_claim(),
            "state": JobState.QUEUED.value,
            "not_before": now,
            "last_error": f"lease expired on worker {job.worker}",
        }

    def request_cancel(self, job_id: int, *, reason: str, now: float | None = None) -> Job | None:
        """Cancel a job: a queued one ends at once; a running one is flagged
        for its worker (and the pool) to stop; an ended one stays as it is.
        Returns the job after the call, or None if there is no such job."""
        moment = _clock(now)
        with self._writing() as conn:
            row = conn.execute(sa.select(JOBS).where(JOBS.c.id == job_id).with_for_update()).first()
            if row is None:
                return None
            state = JobState(row._mapping["state"])
            if state is JobState.QUEUED:
                values: dict[str, Any] = {"state": JobState.CANCELLED.value, "finished_at": moment}
            elif state is JobState.RUNNING:
                values = {"cancel_requested": True}
            else:
                return _job_from_row(row)
            conn.execute(
                JOBS.update()
                .where(JOBS.c.id == job_id, JOBS.c.state == state.value)
                .values(**values, last_error=reason, updated_at=moment)
            )
            return self._fetch(conn, job_id)

    # --------------------------------------------------------------- reads ---

    def get(self, job_id: int) -> Job | None:
        with self._reading() as conn:
            return self._fetch(conn, job_id)

    def _select_jobs(self, query: sa.Select[Any]) -> list[Job]:
        with self._reading() as conn:
            return [_job_from_row(row) for row in conn.execute(query).all()]

    def find_active_by_identity(self, identity: FileIdentity, *, inbox: str | None = None) -> list[Job]:
        """Queued or running jobs for this file: the same (device, inode), or the
        same (size, mtime_ns) as a copy made with -p keeps. Inode matches first."""
        same_inode = sa.and_(
            JOBS.c.file_device == _to_int64(identity.device),
            JOBS.c.file_inode == _to_int64(identity.inode),
        )
        same_content = sa.and_(JOBS.c.file_size == identity.size, JOBS.c.file_mtime_ns == identity.mtime_ns)
        query = sa.select(JOBS).where(JOBS.c.state.in_(_ACTIVE_VALUES), sa.or_(same_inode, same_content))
        if inbox is not None:
            query = query.where(JOBS.c.inbox == inbox)
        jobs = self._select_jobs(query.order_by(JOBS.c.id))

        def exact_first(job: Job) -> tuple[bool, int]:
            exact = job.identity.device == identity.device and job.identity.inode == identity.inode
            return (not exact, job.id)

        return sorted(jobs, key=exact_first)

    def find_by_source(self, path: str) -> list[Job]:
        """Jobs whose source is this absolute path, newest first."""
        return self._select_jobs(sa.select(JOBS).where(JOBS.c.source == path).order_by(JOBS.c.id.desc()))

    def list_jobs(self, *, states: Sequence[JobState] | None = None, limit: int = 50) -> list[Job]:
        """Jobs newest first, optionally only those in `states`."""
        query = sa.select(JOBS).order_by(JOBS.c.id.desc()).limit(limit)
        if states is not None:
            query = query.where(JOBS.c.state.in_([s.value for s in states]))
        return self._select_jobs(query)

    def running_on(self, worker: str) -> list[Job]:
        return self._select_jobs(
            sa.select(JOBS)
            .where(JOBS.c.worker == worker, JOBS.c.state == JobState.RUNNING.value)
            .order_by(JOBS.c.id)
        )

    def counts(self) -> dict[JobState, int]:
        """Number of jobs in every state, zeros included."""
        query = sa.select(JOBS.c.state, sa.func.count()).group_by(JOBS.c.state)
        totals = dict.fromkeys(JobState, 0)
        with self._reading() as conn:
            for state, count in conn.execute(query).all():
                totals[JobState(state)] = int(count)
        return totals

    def output_owner(self, path: str) -> str | None:
        """rel_path of the newest done or running job whose outputs include
        `path`, so two sources never write the same output file."""
        query = (
            sa.select(JOBS.c.rel_path)
            .select_from(JOB_OUTPUTS.join(JOBS, JOBS.c.id == JOB_OUTPUTS.c.job_id))
            .where(
                JOB_OUTPUTS.c.path == path,
                JOBS.c.state.in_([JobState.DONE.value, JobState.RUNNING.value]),
            )
            .order_by(JOBS.c.id.desc())
            .limit(1)
        )
        with self._reading() as conn:
            owner = conn.execute(query).scalar()
        return None if owner is None else str(owner)

    # ------------------------------------------------------- source disposal ---

    def mark_disposed(self, job_id: int, moved_to: str, *, now: float | None = None) -> bool:
        """Record that a finished job's source was moved (to moved_to; "" when
        it was already gone). False if the job is not finished."""
        with self._writing() as conn:
            result = conn.execute(
                JOBS.update()
                .where(JOBS.c.id == job_id, JOBS.c.state.in_([s.value for s in TERMINAL_STATES]))
                .values(disposed_at=_clock(now), disposed_to=moved_to, updated_at=_clock(now))
            )
            return result.rowcount == 1

    def undisposed(self, *, older_than: float = 0.0, now: float | None = None, limit: int = 500) -> list[Job]:
        """Finished jobs whose source has not been moved yet, finished at least
        older_than seconds ago (their worker normally moves them at once)."""
        cutoff = _clock(now) - older_than
        return self._select_jobs(
            sa.select(JOBS)
            .where(
                JOBS.c.state.in_([s.value for s in TERMINAL_STATES]),
                JOBS.c.disposed_at.is_(None),
                JOBS.c.finished_at <= cutoff,
            )
            .order_by(JOBS.c.id)
            .limit(limit)
        )

    def record_rejected(
        self, spec: JobSpec, identity: FileIdentity, *, reason: str, now: float | None = None
    ) -> Job:
        """A file refused before it became a job (a symlink, ...): recorded as
        a failed job so its reason is in the store like any other failure."""
        moment = _clock(now)
        with self._writing() as conn:
            result = conn.execute(
                JOBS.insert().values(
                    **_new_row(spec, identity, moment),
                    state=JobState.FAILED.value,
                    max_attempts=1,
                    finished_at=moment,
                    last_error=reason,
                )
            )
            key = result.inserted_primary_key
            job = None if key is None else self._fetch(conn, int(key[0]))
        if job is None:
            raise WhisperdError(f"{self._where}: rejected job for {spec.source} cannot be read back")
        return job

    # --------------------------------------------------------- model memory ---

    def record_model_memory(
        self, model: str, device_kind: str, bytes: int, *, now: float | None = None
    ) -> None:
        """Remember how much device memory `model` took on `device_kind`."""
        moment = _clock(now)
        key = sa.and_(MODEL_MEMORY.c.model == model, MODEL_MEMORY.c.device_kind == device_kind)

        def upsert(conn: Connection) -> None:
            updated = conn.execute(MODEL_MEMORY.update().where(key).values(bytes=bytes, measured_at=moment))
            if updated.rowcount == 0:
                row = {"model": model, "device_kind": device_kind, "bytes": bytes, "measured_at": moment}
                conn.execute(MODEL_MEMORY.insert().values(**row))

        self._write_racing_inserts(upsert)

    def model_memory(self, model: str, device_kind: str) -> int | None:
        query = sa.select(MODEL_MEMORY.c.bytes).where(
            MODEL_MEMORY.c.model == model, MODEL_MEMORY.c.device_kind == device_kind
        )
        with self._reading() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else int(value)
