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

import functools
import json
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, Row
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry

from whisperd import store_counts, store_deferrals, store_hooks, store_instances, store_notify
from whisperd.errors import StoreUnavailable, WhisperdError
from whisperd.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    AttemptEnd,
    AttemptOutcome,
    Claim,
    FileIdentity,
    Job,
    JobSpec,
    JobState,
)
from whisperd.store_deferrals import DeferredFile
from whisperd.store_hooks import HookDelivery
from whisperd.store_instances import InstanceEntry
from whisperd.store_notify import StoreListener, StoreNotice
from whisperd.store_outage import RetryPolicy, StoreHealth, outage_reason

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


def _define_source_moves(metadata: sa.MetaData) -> sa.Table:
    """Failed attempts at a finished job's owed source move: how many, when
    the next is due, and, once whisperd gave up (a permanent error or too
    many attempts), why the source is stuck in its inbox."""
    return sa.Table(
        "source_moves",
        metadata,
        sa.Column("job_id", sa.Integer, primary_key=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", sa.Float, nullable=False),
        sa.Column("stuck_reason", sa.Text),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def _migration_4_source_moves(conn: Connection) -> None:
    metadata = sa.MetaData()
    _define_source_moves(metadata)
    metadata.create_all(conn, checkfirst=False)


def _define_operator_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The operator's tables: one row per attempt of a job (who ran it,
    where, when, how it ended: `whisperd show`), and the paused inboxes
    (`whisperd pause`), whose queued jobs no worker claims."""
    job_attempts = sa.Table(
        "job_attempts",
        metadata,
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("claim_token", sa.String(36), nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        # The job's state right after the attempt (queued: it was retried or handed back).
        sa.Column("outcome", sa.String(16)),
        sa.Column("error", sa.Text),
    )
    sa.Index("ix_job_attempts_job", job_attempts.c.job_id, job_attempts.c.attempt)
    paused_inboxes = sa.Table(
        "paused_inboxes",
        metadata,
        sa.Column("inbox", sa.Text, primary_key=True),
        sa.Column("paused_at", sa.Float, nullable=False),
    )
    return job_attempts, paused_inboxes


def _migration_5_operator(conn: Connection) -> None:
    metadata = sa.MetaData()
    _define_operator_tables(metadata)
    metadata.create_all(conn, checkfirst=False)
    # Retention finds finished jobs by age without reading the whole table;
    # status lists the few running and queued jobs newest first without
    # walking a million finished ones.
    conn.exec_driver_sql("CREATE INDEX ix_jobs_finished ON jobs (finished_at)")
    conn.exec_driver_sql("CREATE INDEX ix_jobs_state_id ON jobs (state, id)")


def _migration_6_instance_registry(conn: Connection) -> None:
    # The registry of daemons sharing the store and the inboxes each watches
    # (store_instances.py): one name per live daemon, claims by affinity.
    metadata = sa.MetaData()
    store_instances.define_instance_tables(metadata)
    metadata.create_all(conn, checkfirst=False)


# Columns added by migration 7: when the engine began the running attempt
# (after the model load), and how long a done job's engine ran: the ETA's
# clock and the realtime factor of earlier jobs of a model on a device.
_V7_COLUMNS = (("decoding_started_at", sa.Float()), ("decoding_seconds", sa.Float()))


def _migration_7_decoding_time(conn: Connection) -> None:
    for name, type_ in _V7_COLUMNS:
        compiled = type_.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE jobs ADD COLUMN {name} {compiled}")


def _migration_8_hook_deliveries(conn: Connection) -> None:
    # Completion hooks (store_hooks.py): the deliveries each job end owes,
    # written with the job's end, and the hooks each inbox has.
    metadata = sa.MetaData()
    store_hooks.define_hook_tables(metadata)
    metadata.create_all(conn, checkfirst=False)


# Column added by migration 9: why the last failed attempt at an owed source
# move failed, so `whisperd status` can say why a source is still waiting.
_V9_SOURCE_MOVE_COLUMN = ("last_reason", sa.Text())


def _migration_9_move_reason(conn: Connection) -> None:
    name, type_ = _V9_SOURCE_MOVE_COLUMN
    conn.exec_driver_sql(f"ALTER TABLE source_moves ADD COLUMN {name} {type_.compile(dialect=conn.dialect)}")


def _migration_10_claim_order(conn: Connection) -> None:
    # The claim takes the best queued job: priority first, then oldest. An
    # index in exactly that order lets the database walk it and stop at the
    # first claimable rows; ix_jobs_claim (not_before between priority and id)
    # made every claim sort all queued rows (bench/claims.py has the plans).
    conn.exec_driver_sql("CREATE INDEX ix_jobs_claim_order ON jobs (state, priority DESC, id)")
    conn.exec_driver_sql("DROP INDEX ix_jobs_claim")


def _migration_11_deferred_files(conn: Connection) -> None:
    # A new file waiting for the job at its path to end (store_deferrals.py):
    # job state in the store, so a restart keeps it.
    metadata = sa.MetaData()
    store_deferrals.define_deferral_table(metadata)
    metadata.create_all(conn, checkfirst=False)


# Applied in order; the schema version is the number applied. Append, never edit.
MIGRATIONS: tuple[Migration, ...] = (
    _migration_1_create_tables,
    _migration_2_source_disposal,
    _migration_3_output_index,
    _migration_4_source_moves,
    _migration_5_operator,
    _migration_6_instance_registry,
    _migration_7_decoding_time,
    _migration_8_hook_deliveries,
    _migration_9_move_reason,
    _migration_10_claim_order,
    _migration_11_deferred_files,
    store_instances.add_lease_column,
    store_counts.add_state_counts,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The tables as the current code reads and writes them.
_METADATA = sa.MetaData()
JOBS, MODEL_MEMORY = _define_v1(_METADATA)
for _name, _type in (*_V2_COLUMNS, *_V7_COLUMNS):
    JOBS.append_column(sa.Column(_name, _type))
sa.Index("ix_jobs_undisposed", JOBS.c.state, JOBS.c.disposed_at)
JOB_OUTPUTS = _define_job_outputs(_METADATA)
SOURCE_MOVES = _define_source_moves(_METADATA)
SOURCE_MOVES.append_column(sa.Column(*_V9_SOURCE_MOVE_COLUMN))
JOB_ATTEMPTS, PAUSED_INBOXES = _define_operator_tables(_METADATA)
DEFERRED_FILES = store_deferrals.define_deferral_table(_METADATA)
sa.Index("ix_jobs_finished", JOBS.c.finished_at)
sa.Index("ix_jobs_state_id", JOBS.c.state, JOBS.c.id)
sa.Index("ix_jobs_claim_order", JOBS.c.state, JOBS.c.priority.desc(), JOBS.c.id)
JOBS.indexes.difference_update({i for i in JOBS.indexes if i.name == "ix_jobs_claim"})  # dropped by v10
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


def _state_after(job: Job, outcome: AttemptOutcome) -> JobState:
    """The rule of what a running job becomes when its attempt ends, written
    once: a done job is done; a file's own failure fails it; otherwise a
    requested cancel wins; a released job goes back uncounted; a failed
    attempt goes back while attempts remain."""
    if outcome is AttemptOutcome.DONE:
        return JobState.DONE
    if outcome is AttemptOutcome.FAILED:
        return JobState.FAILED
    if outcome is AttemptOutcome.CANCELLED or job.cancel_requested:
        return JobState.CANCELLED
    if outcome is AttemptOutcome.RELEASED or job.attempts < job.max_attempts:
        return JobState.QUEUED
    return JobState.FAILED


def _attempt_end_values(job: Job, end: AttemptEnd, now: float) -> tuple[JobState, dict[str, Any]]:
    """The state `end` takes `job` to, and the columns that say so."""
    state = _state_after(job, end.outcome)
    values: dict[str, Any] = {"state": state.value, "updated_at": now, "last_error": end.error}
    if state is JobState.CANCELLED and end.outcome is not AttemptOutcome.CANCELLED:
        # Cancelled because it was asked for: the cancel's reason says why.
        values["last_error"] = job.last_error
    if end.audio_seconds is not None:
        values["audio_seconds"] = end.audio_seconds
    if state is JobState.QUEUED:
        values.update(_cleared_claim())
        if end.outcome is AttemptOutcome.RELEASED:
            values["attempts"] = max(0, job.attempts - 1)
            values["not_before"] = now
        else:
            delay = _retry_delay(job.attempts, end.retry_base_seconds, end.retry_max_seconds)
            values["not_before"] = now + delay
        if end.identity is not None:
            values.update(_identity_columns(end.identity))
        return state, values
    values.update(finished_at=now, lease_expires=None)
    # Outputs recorded earlier by set_outputs stay unless new ones are given.
    if end.outputs:
        values["outputs_json"] = json.dumps(list(end.outputs))
    if state is JobState.DONE:
        values.update(progress=1.0, eta_seconds=0.0)
        if end.decoding_seconds is not None:
            values["decoding_seconds"] = end.decoding_seconds
    return state, values


def _lease_expired_end(job: Job) -> AttemptEnd:
    """A lease that ran out is a failed attempt, retried at once (the worker
    died or hung: no backoff helps)."""
    if job.attempts >= job.max_attempts:
        error = f"worker died {job.attempts} times on this file (last: {job.worker})"
    else:
        error = f"lease expired on worker {job.worker}"
    return AttemptEnd(
        outcome=AttemptOutcome.RETRY, error=error, retry_base_seconds=0.0, retry_max_seconds=0.0
    )


def _identity_columns(identity: FileIdentity) -> dict[str, Any]:
    return {
        "file_device": _to_int64(identity.device),
        "file_inode": _to_int64(identity.inode),
        "file_size": identity.size,
        "file_mtime_ns": identity.mtime_ns,
    }


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
        decoding_started_at=m.get("decoding_started_at"),
        decoding_seconds=m.get("decoding_seconds"),
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


# ------------------------------------- operator helpers (history, pauses) ---


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One attempt at a job, as `whisperd show` reports it."""

    # 1 for the first claim of the job, counting up (a retried job continues).
    number: int
    # Worker id (host/pid/slot) and device label it ran on.
    worker: str
    device: str
    started_at: float
    # None while the attempt runs.
    ended_at: float | None
    # The job's state right after the attempt: done, failed, cancelled, or
    # queued (retried after an error, handed back at shutdown, lease lost).
    outcome: str | None
    # Why it did not end done (None: it did, or it is still running).
    error: str | None


def _not_paused() -> sa.ColumnElement[bool]:
    """A job's inbox is not paused (claims skip paused inboxes)."""
    return ~sa.exists().where(PAUSED_INBOXES.c.inbox == JOBS.c.inbox)


def _attempt_started(conn: Connection, job: Job, token: str, now: float) -> None:
    conn.execute(
        JOB_ATTEMPTS.insert().values(
            job_id=job.id,
            attempt=job.attempts,
            claim_token=token,
            worker=job.worker or "",
            device=job.device or "",
            started_at=now,
        )
    )


def _attempt_ended(conn: Connection, job_id: int, token: str, values: dict[str, Any]) -> None:
    """Close the attempt of `token` with the state the job was just moved to."""
    conn.execute(
        JOB_ATTEMPTS.update()
        .where(
            JOB_ATTEMPTS.c.job_id == job_id,
            JOB_ATTEMPTS.c.claim_token == token,
            JOB_ATTEMPTS.c.ended_at.is_(None),
        )
        .values(
            ended_at=values.get("updated_at", time.time()),
            outcome=values["state"],
            error=values.get("last_error"),
        )
    )


def _finished_and_moved() -> sa.ColumnElement[bool]:
    """Jobs retention may delete: ended, their source moved (an owed or
    stuck move keeps its job, which says where the file is and why), and no
    completion hook still owed (it is delivered or given up first)."""
    deliveries = store_hooks.HOOK_DELIVERIES
    return sa.and_(
        JOBS.c.state.in_([s.value for s in TERMINAL_STATES]),
        JOBS.c.disposed_at.is_not(None),
        ~sa.exists().where(deliveries.c.job_id == JOBS.c.id, deliveries.c.state == store_hooks.PENDING),
    )


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


# ------------------------------------------------------------------- store ---


class JobStore:
    """Jobs in a database. Thread-safe; any number of processes and hosts may
    open the same database. Build with JobStore.open(url); close() when done."""

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
        cls,
        url: str,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout_seconds: float = SQLITE_BUSY_TIMEOUT_MS / 1000,
        retry: RetryPolicy | None = None,
    ) -> JobStore:
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
    def open_read_only(cls, url: str, *, migrations: Sequence[Migration] = MIGRATIONS) -> JobStore:
        """Connect for reading only (status, jobs): never creates the database,
        never migrates; a missing store or another schema version is an error."""
        from whisperd.store_readonly import check_schema_version, read_only_engine

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
        """A listener for this store's wake-ups (store_notify.py), not yet
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
        if result.rowcount == 1 and values.get("state", JobState.RUNNING.value) != JobState.RUNNING.value:
            _attempt_ended(conn, job_id, token, values)
            # Every end of a running job passes here: its hook deliveries are owed from this commit.
            ended_at = values.get("updated_at", time.time())
            store_hooks.record_job_end(conn, JOBS, job_id, values["state"], ended_at)
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

    @staticmethod
    def _finished_unmoved(conn: Connection, spec: JobSpec, identity: FileIdentity) -> Job | None:
        """The finished job of this very file (same path and identity) whose
        source is still owed a move: the file stayed in the inbox because it
        could not be moved, and must not be transcribed again."""
        row = conn.execute(
            sa.select(JOBS)
            .where(
                JOBS.c.inbox == spec.inbox,
                JOBS.c.rel_path == spec.rel_path,
                JOBS.c.state.in_([s.value for s in TERMINAL_STATES]),
                JOBS.c.disposed_at.is_(None),
                JOBS.c.file_device == _to_int64(identity.device),
                JOBS.c.file_inode == _to_int64(identity.inode),
                JOBS.c.file_size == identity.size,
                JOBS.c.file_mtime_ns == identity.mtime_ns,
            )
            .order_by(JOBS.c.id.desc())
            .limit(1)
        ).first()
        return None if row is None else _job_from_row(row)

    @staticmethod
    def _moved_twin(conn: Connection, spec: JobSpec, identity: FileIdentity) -> Job | None:
        """The last job of this path, if it ended and moved out this very file
        (same identity): a host that saw the file before that move and queues
        it after would run a job for a file that is gone."""
        row = conn.execute(
            sa.select(JOBS)
            .where(JOBS.c.inbox == spec.inbox, JOBS.c.rel_path == spec.rel_path)
            .order_by(JOBS.c.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        job = _job_from_row(row)
        if job.state.is_active or job.disposed_at is None or job.identity != identity:
            return None
        return job

    def enqueue_many(
        self,
        items: Sequence[tuple[JobSpec, FileIdentity]],
        *,
        max_attempts: int,
        now: float | None = None,
        skip_moved_twins: bool = False,
    ) -> list[tuple[Job, bool]]:
        """enqueue() for many files in one transaction: one commit (one fsync)
        instead of one per file, which is what bounds how fast a folder of
        2,000 dropped files becomes jobs. Returns enqueue()'s answer per item,
        in order; a file listed twice is queued once.

        skip_moved_twins: a file whose path's last job ended and moved out
        this very file (same identity) is not queued; that job is returned
        (not new). The caller tells a late sighting (the file is gone) from
        the same file put back (it is there) and enqueue()s the latter."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        moment = _clock(now)
        return self._write_racing_inserts(
            lambda conn: [
                self._enqueue_in(
                    conn, spec, identity, max_attempts, moment, skip_moved_twins=skip_moved_twins
                )
                for spec, identity in items
            ]
        )

    def _enqueue_in(
        self,
        conn: Connection,
        spec: JobSpec,
        identity: FileIdentity,
        max_attempts: int,
        now: float,
        *,
        skip_moved_twins: bool = False,
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
        unmoved = self._finished_unmoved(conn, spec, identity)
        if unmoved is not None:
            return unmoved, False
        twin = self._moved_twin(conn, spec, identity) if skip_moved_twins else None
        if twin is not None:
            return twin, False
        result = conn.execute(
            JOBS.insert().values(
                **_new_row(spec, identity, now), state=JobState.QUEUED.value, max_attempts=max_attempts
            )
        )
        job_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        job = None if job_id is None else self._fetch(conn, int(job_id))
        if job is None:
            raise WhisperdError(f"{self._where}: inserted job for {spec.source} cannot be read back")
        store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=spec.inbox))
        return job, True

    # ---------------------------------------------------------------- claim ---

    def claim(
        self,
        *,
        worker: str,
        device: str,
        lease_seconds: float,
        inboxes: Sequence[str] | None = None,
        instance: str | None = None,
        now: float | None = None,
    ) -> Claim | None:
        """Take the best claimable job (priority first, then oldest) or None.

        inboxes: only jobs of these inboxes; instance: only jobs of the
        inboxes that instance registered (set_instance_inboxes), read at each
        claim so a reload's inboxes apply to running workers at once.
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
                _not_paused(),
            )
            .order_by(JOBS.c.priority.desc(), JOBS.c.id.asc())
            .limit(CLAIM_CANDIDATES)
            # Other hosts skip rows we are looking at (nothing on SQLite, where
            # BEGIN IMMEDIATE already serialises claims).
            .with_for_update(skip_locked=True)
        )
        if inboxes is not None:
            query = query.where(JOBS.c.inbox.in_(list(inboxes)))
        if instance is not None:
            query = query.where(JOBS.c.inbox.in_(store_instances.watched_by(instance)))
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
                        lease_expires=_lease_clock(now) + lease_seconds,
                        progress=0.0,
                        eta_seconds=None,
                        decoding_started_at=None,
                        decoding_seconds=None,
                        updated_at=moment,
                    )
                )
                if taken.rowcount == 1:
                    job = self._fetch(conn, job_id)
                    if job is not None:
                        _attempt_started(conn, job, token, moment)
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
        values: dict[str, Any] = {"lease_expires": _lease_clock(now) + lease_seconds, "updated_at": moment}
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
        values = {**_identity_columns(identity), "updated_at": _clock(now)}
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, values)

    def decoding_started(self, job_id: int, token: str, *, now: float | None = None) -> bool:
        """Record that the running attempt's engine began (its model is
        loaded): the ETA and realtime factor count from here."""
        moment = _clock(now)
        with self._writing() as conn:
            return self._fenced_update(
                conn, job_id, token, {"decoding_started_at": moment, "updated_at": moment}
            )

    def realtime_factor(self, model: str, engine: str, device: str, *, sample: int = 20) -> float | None:
        """Seconds of engine time per second of audio of the last `sample`
        done jobs of this model and engine on this device (the median: one
        job slowed by a busy neighbour does not skew it); None without any.
        The model is read from each row's spec, so a few more rows are read
        than kept; the finished-at index keeps that to the newest ones."""
        query = (
            sa.select(JOBS.c.spec_json, JOBS.c.decoding_seconds, JOBS.c.audio_seconds)
            .where(
                JOBS.c.state == JobState.DONE.value,
                JOBS.c.device == device,
                JOBS.c.decoding_seconds.is_not(None),
                JOBS.c.audio_seconds > 0,
            )
            .order_by(JOBS.c.finished_at.desc())
            .limit(sample * 10)
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        factors = []
        for spec_json, seconds, audio in rows:
            spec = JobSpec.from_dict(json.loads(spec_json))
            if spec.model == model and spec.options.engine == engine:
                factors.append(float(seconds) / float(audio))
        return statistics.median(factors[:sample]) if factors else None

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

    def end_attempt(
        self, job_id: int, token: str, end: AttemptEnd, *, now: float | None = None
    ) -> JobState | None:
        """End the running attempt `token` holds: the one transition every
        end of an attempt goes through (see _state_after for the rule).

        Returns the state the job reached, or None if the token no longer holds
        (lease lost). Ending again with the same token and the same end returns
        the state reached and changes nothing (a caller may retry after a lost
        reply); a job handed back to the queue forgets its token, so ending it
        again is None.
        """
        moment = _clock(now)
        with self._writing() as conn:
            # Locked (PostgreSQL): a cancel asked for meanwhile waits, then sees the end.
            row = conn.execute(sa.select(JOBS).where(JOBS.c.id == job_id).with_for_update()).first()
            job = None if row is None else _job_from_row(row)
            if job is None or job.claim_token != token:
                return None
            state, values = _attempt_end_values(job, end, moment)
            if job.state is not JobState.RUNNING:
                # Already ended under this token: the same end again is a no-op.
                same = job.state is state and job.last_error == values.get("last_error")
                return state if same and state in TERMINAL_STATES else None
            if not self._fenced_update(conn, job_id, token, values):
                return None
            if end.outputs and state is not JobState.QUEUED:
                _record_outputs(conn, job_id, end.outputs)
            if state is JobState.QUEUED and values["not_before"] <= moment:
                # Due now (a shutdown, a drained device): another host's idle worker may take it.
                store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=job.spec.inbox))
        return state

    # ------------------------------------------------------ supervision ---

    def reclaim_stale(self, *, now: float | None = None) -> list[Job]:
        """Running jobs whose lease ran out (their worker died or hung): a
        failed attempt by the shared rule (back to the queue at once, failed
        once out of attempts, cancelled if asked). Returns the jobs as they are
        afterwards."""
        moment = _clock(now)
        query = (
            sa.select(JOBS)
            .where(JOBS.c.state == JobState.RUNNING.value, JOBS.c.lease_expires < _lease_clock(now))
            .order_by(JOBS.c.id)
            .with_for_update(skip_locked=True)
        )
        reclaimed: list[Job] = []
        with self._writing() as conn:
            for row in conn.execute(query).all():
                job = _job_from_row(row)
                assert job.claim_token is not None  # running jobs always hold a token
                _state, values = _attempt_end_values(job, _lease_expired_end(job), moment)
                if self._fenced_update(conn, job.id, job.claim_token, values):
                    after = self._fetch(conn, job.id)
                    if after is not None:
                        reclaimed.append(after)
            for inbox in sorted({j.spec.inbox for j in reclaimed if j.state is JobState.QUEUED}):
                store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=inbox))
        return reclaimed

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
            if state is JobState.RUNNING:
                inbox = str(row._mapping["inbox"])
                store_notify.notify(conn, StoreNotice(kind=store_notify.CANCEL, inbox=inbox, job_id=job_id))
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

    def queued_with_inodes(self, inbox: str, files: Sequence[tuple[int, int]]) -> list[Job]:
        """Queued jobs of `inbox` whose file is one of these (device, inode):
        one query for a whole batch of new files (renames.py)."""
        by_device: dict[int, list[int]] = {}
        for device, inode in files:
            by_device.setdefault(device, []).append(inode)
        if not by_device:
            return []
        same = sa.or_(
            *(
                sa.and_(
                    JOBS.c.file_device == _to_int64(device),
                    JOBS.c.file_inode.in_([_to_int64(i) for i in inodes]),
                )
                for device, inodes in by_device.items()
            )
        )
        query = sa.select(JOBS).where(JOBS.c.inbox == inbox, JOBS.c.state == JobState.QUEUED.value, same)
        return self._select_jobs(query.order_by(JOBS.c.id))

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

    def running_of_instance(self, instance: str) -> list[Job]:
        """Running jobs of `instance`'s workers (worker ids "<instance>/<slot>").
        The state index narrows the look-up to running jobs (a few per slot of
        every host); the prefix is compared exactly, not by a collation's order
        or LIKE's case rules, on both databases."""
        prefix = f"{instance}/"
        return self._select_jobs(
            sa.select(JOBS)
            .where(
                JOBS.c.state == JobState.RUNNING.value,
                sa.func.substr(JOBS.c.worker, 1, len(prefix)) == prefix,
            )
            .order_by(JOBS.c.id)
        )

    def counts(self) -> dict[JobState, int]:
        """Number of jobs in every state, zeros included."""
        totals = dict.fromkeys(JobState, 0)
        with self._reading() as conn:
            for state, count in store_counts.read(conn).items():
                totals[JobState(state)] = count
        return totals

    def fold_state_counts(self) -> int:
        """Fold the state counts' deltas into their totals (store_counts.py),
        keeping counts() cheap; returns how many were folded."""
        with self._writing() as conn:
            return store_counts.fold(conn)

    def claimable_count(self, inboxes: Sequence[str]) -> int:
        """Queued jobs an instance watching `inboxes` may claim (a paused
        inbox's jobs wait; another host's private inboxes are not its work)."""
        if not inboxes:
            return 0
        query = (
            sa.select(sa.func.count())
            .select_from(JOBS)
            .where(JOBS.c.state == JobState.QUEUED.value, JOBS.c.inbox.in_(list(inboxes)), _not_paused())
        )
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def output_owner(self, path: str) -> str | None:
        """rel_path of the newest done or running job whose outputs include
        `path`, so two sources never write the same output file."""
        owner = self.output_owner_job(path)
        return None if owner is None else owner[1]

    def output_owner_job(self, path: str) -> tuple[int, str] | None:
        """(job id, rel_path) of the newest done or running job whose outputs
        include `path`: a name dropped again is another job with the same rel_path."""
        query = (
            sa.select(JOBS.c.id, JOBS.c.rel_path)
            .select_from(JOB_OUTPUTS.join(JOBS, JOBS.c.id == JOB_OUTPUTS.c.job_id))
            .where(
                JOB_OUTPUTS.c.path == path,
                JOBS.c.state.in_([JobState.DONE.value, JobState.RUNNING.value]),
            )
            .order_by(JOBS.c.id.desc())
            .limit(1)
        )
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row[0]), str(row[1]))

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

    def undisposed(
        self,
        *,
        older_than: float = 0.0,
        inboxes: Sequence[str] | None = None,
        now: float | None = None,
        limit: int = 500,
    ) -> list[Job]:
        """Finished jobs whose source has not been moved yet, finished at least
        older_than seconds ago (their worker normally moves them at once);
        only those of `inboxes` when given (a host moves only what it sees)."""
        cutoff = _clock(now) - older_than
        # Not those stuck, nor those whose next attempt is not yet due.
        waiting = sa.exists().where(
            SOURCE_MOVES.c.job_id == JOBS.c.id,
            sa.or_(SOURCE_MOVES.c.stuck_reason.is_not(None), SOURCE_MOVES.c.next_at > _clock(now)),
        )
        query = sa.select(JOBS).where(
            JOBS.c.state.in_([s.value for s in TERMINAL_STATES]),
            JOBS.c.disposed_at.is_(None),
            JOBS.c.finished_at <= cutoff,
            ~waiting,
        )
        if inboxes is not None:
            query = query.where(JOBS.c.inbox.in_(list(inboxes)))
        return self._select_jobs(query.order_by(JOBS.c.id).limit(limit))

    def record_move_failure(
        self,
        job_id: int,
        *,
        stuck_reason: str | None,
        next_at: float,
        reason: str = "",
        now: float | None = None,
    ) -> int:
        """Record a failed attempt at job_id's owed source move (why: reason):
        the next one is due at next_at, or none when stuck_reason says why
        whisperd gave up. Returns the number of failed attempts so far, this
        one included."""
        moment = _clock(now)
        key = SOURCE_MOVES.c.job_id == job_id

        def upsert(conn: Connection) -> int:
            before = conn.execute(sa.select(SOURCE_MOVES.c.attempts).where(key)).scalar()
            values = {
                "next_at": next_at,
                "stuck_reason": stuck_reason,
                "last_reason": reason or stuck_reason,
                "updated_at": moment,
            }
            if before is None:
                conn.execute(SOURCE_MOVES.insert().values(job_id=job_id, attempts=1, **values))
                return 1
            conn.execute(SOURCE_MOVES.update().where(key).values(attempts=before + 1, **values))
            return int(before) + 1

        return self._write_racing_inserts(upsert)

    def move_attempts(self, job_id: int) -> int:
        """Failed attempts recorded at job_id's owed source move."""
        with self._reading() as conn:
            value = conn.execute(
                sa.select(SOURCE_MOVES.c.attempts).where(SOURCE_MOVES.c.job_id == job_id)
            ).scalar()
        return 0 if value is None else int(value)

    def stuck_sources(self, *, limit: int = 1000) -> list[tuple[Job, str]]:
        """Finished jobs whose source whisperd gave up moving, with the reason."""
        query = (
            sa.select(JOBS, SOURCE_MOVES.c.stuck_reason)
            .join(SOURCE_MOVES, SOURCE_MOVES.c.job_id == JOBS.c.id)
            .where(SOURCE_MOVES.c.stuck_reason.is_not(None), JOBS.c.disposed_at.is_(None))
            .order_by(JOBS.c.id)
            .limit(limit)
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return [(_job_from_row(row), str(row._mapping["stuck_reason"])) for row in rows]

    def retrying_moves(self, *, limit: int = 1000) -> list[tuple[Job, int, str]]:
        """Finished jobs whose owed source move failed and will be tried
        again: each with its failed attempts so far and the last reason."""
        query = (
            sa.select(JOBS, SOURCE_MOVES.c.attempts, SOURCE_MOVES.c.last_reason)
            .join(SOURCE_MOVES, SOURCE_MOVES.c.job_id == JOBS.c.id)
            .where(SOURCE_MOVES.c.stuck_reason.is_(None), JOBS.c.disposed_at.is_(None))
            .order_by(JOBS.c.id)
            .limit(limit)
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return [
            (_job_from_row(row), int(row._mapping["attempts"]), str(row._mapping["last_reason"] or "?"))
            for row in rows
        ]

    def forget_move_failures(self, job_id: int | None = None) -> int:
        """Forget failed source moves (of one job, or all): they are tried
        again at the next sweep. Returns how many jobs that concerned."""
        delete = SOURCE_MOVES.delete()
        if job_id is not None:
            delete = delete.where(SOURCE_MOVES.c.job_id == job_id)
        with self._writing() as conn:
            return int(conn.execute(delete).rowcount)

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

    # ------------------------------------------------------------ instances ---

    def register_instance(self, entry: InstanceEntry, *, stale_after: float) -> InstanceEntry | None:
        """Register this daemon under entry.instance. Returns the live daemon
        already holding that name (heartbeat younger than stale_after, another
        state folder) instead; nothing is written then."""
        return self._write_racing_inserts(
            lambda conn: store_instances.register(conn, entry, stale_after=stale_after, db_now=_DbEpoch())
        )

    def instance_heartbeat(self, instance: str, token: str) -> bool:
        """Renew the instance's heartbeat; False if another daemon took its name over."""
        with self._writing() as conn:
            return store_instances.beat(conn, instance, token, db_now=_DbEpoch())

    def set_instance_inboxes(
        self, instance: str, inboxes: Sequence[tuple[str, str]], *, stale_after: float
    ) -> list[tuple[str, str, str]]:
        """Record the inboxes (name, path) the instance watches, less those
        another live instance watches at another path under the same name;
        returns those conflicts (inbox, other instance, its path)."""

        def write(conn: Connection) -> list[tuple[str, str, str]]:
            conflicts = store_instances.path_conflicts(
                conn, instance, inboxes, stale_after=stale_after, db_now=_DbEpoch()
            )
            clashing = {inbox for inbox, _other, _path in conflicts}
            store_instances.set_inboxes(conn, instance, [i for i in inboxes if i[0] not in clashing])
            return conflicts

        return self._write_racing_inserts(write)

    def unregister_instance(self, instance: str, token: str) -> None:
        with self._writing() as conn:
            store_instances.unregister(conn, instance, token)

    def instances(self) -> list[InstanceEntry]:
        """Every registered daemon, alive or stale (see age_seconds)."""
        with self._reading() as conn:
            return store_instances.list_instances(conn, db_now=_DbEpoch())

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

    # ------------------------------- operator: retention, history, retry, pause ---

    def prune_finished(
        self, *, keep_days: float, keep_jobs: int, batch: int = 500, now: float | None = None
    ) -> int:
        """Delete up to `batch` finished jobs (done, failed, cancelled, source
        moved) older than keep_days or beyond the newest keep_jobs finished
        ones (0: no such limit), with their outputs, moves and attempts
        records. Never a queued or running job, nor one whose source move is
        still owed. Returns how many were deleted."""
        moment = _clock(now)
        # Chosen in a read transaction, so the write lock is held only for the deletes.
        with self._reading() as conn:
            ids = self._prune_candidates(conn, keep_days, keep_jobs, batch, moment)
        if not ids:
            return 0
        with self._writing() as conn:
            # The state test again: nothing that became active meanwhile goes.
            ids = list(
                conn.execute(sa.select(JOBS.c.id).where(JOBS.c.id.in_(ids), _finished_and_moved())).scalars()
            )
            for table, column in (
                (JOB_OUTPUTS, JOB_OUTPUTS.c.job_id),
                (SOURCE_MOVES, SOURCE_MOVES.c.job_id),
                (JOB_ATTEMPTS, JOB_ATTEMPTS.c.job_id),
                (store_hooks.HOOK_DELIVERIES, store_hooks.HOOK_DELIVERIES.c.job_id),
                (JOBS, JOBS.c.id),
            ):
                conn.execute(table.delete().where(column.in_(ids)))
        return len(ids)

    @staticmethod
    def _prune_candidates(
        conn: Connection, keep_days: float, keep_jobs: int, batch: int, now: float
    ) -> list[int]:
        found: list[int] = []
        if keep_days > 0:
            # Oldest first along ix_jobs_finished: a pass with nothing to do reads one entry.
            old = (
                sa.select(JOBS.c.id)
                .where(JOBS.c.finished_at < now - keep_days * 86400.0, _finished_and_moved())
                .order_by(JOBS.c.finished_at)
                .limit(batch)
            )
            found.extend(conn.execute(old).scalars())
        if keep_jobs > 0 and len(found) < batch:
            # The newest finished job beyond keep_jobs: the primary key walked
            # backwards, so this costs keep_jobs steps, not the table.
            boundary = conn.execute(
                sa.select(JOBS.c.id)
                .where(JOBS.c.state.in_([s.value for s in TERMINAL_STATES]))
                .order_by(JOBS.c.id.desc())
                .offset(keep_jobs)
                .limit(1)
            ).scalar()
            if boundary is not None:
                excess = (
                    sa.select(JOBS.c.id)
                    .where(JOBS.c.id <= boundary, _finished_and_moved(), JOBS.c.id.not_in(found))
                    .order_by(JOBS.c.id)
                    .limit(batch - len(found))
                )
                found.extend(conn.execute(excess).scalars())
        return [int(i) for i in found]

    def _sqlite_script(self, script: str) -> None:
        """Run `script` outside any transaction (PRAGMAs that must step to the
        end, VACUUM) on a connection of the pool (SQLite only)."""
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.executescript(script)  # type: ignore[union-attr]
        finally:
            raw.close()

    def enable_incremental_vacuum(self) -> bool:
        """Switch an SQLite file made before whisperd set auto_vacuum to
        INCREMENTAL (a one-time VACUUM: it rewrites the file, so the daemon
        does it at start, before its workers open the store). True if it did;
        False on PostgreSQL or when the file is already incremental."""
        if self._engine.dialect.name != "sqlite":
            return False
        with self._reading() as conn:
            mode = conn.exec_driver_sql("PRAGMA auto_vacuum").scalar()
        if mode == 2:
            return False
        self._sqlite_script("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")
        return True

    def vacuum_free_pages(self, pages: int = 2000) -> int:
        """Hand up to `pages` free pages back to the file system (SQLite with
        auto_vacuum=INCREMENTAL; nothing elsewhere: PostgreSQL's autovacuum
        reuses the space). Returns the free pages left."""
        if self._engine.dialect.name != "sqlite" or pages < 1:  # 0 would mean "all"
            return 0
        # A passive checkpoint then lets the main file shrink without waiting for readers.
        self._sqlite_script(f"PRAGMA incremental_vacuum({int(pages)}); PRAGMA wal_checkpoint(PASSIVE);")
        with self._reading() as conn:
            return int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)

    def attempts_of(self, job_id: int) -> list[Attempt]:
        """Every recorded attempt at a job, oldest first."""
        query = (
            sa.select(JOB_ATTEMPTS)
            .where(JOB_ATTEMPTS.c.job_id == job_id)
            .order_by(JOB_ATTEMPTS.c.attempt, JOB_ATTEMPTS.c.started_at)
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return [
            Attempt(
                number=int(m["attempt"]),
                worker=str(m["worker"]),
                device=str(m["device"]),
                started_at=float(m["started_at"]),
                ended_at=m["ended_at"],
                outcome=m["outcome"],
                error=m["error"],
            )
            for m in (row._mapping for row in rows)
        ]

    def source_stuck_reason(self, job_id: int) -> str | None:
        """Why whisperd gave up moving this finished job's source (None: it did not)."""
        with self._reading() as conn:
            return conn.execute(
                sa.select(SOURCE_MOVES.c.stuck_reason).where(SOURCE_MOVES.c.job_id == job_id)
            ).scalar()

    def requeue_ended(
        self,
        job_id: int,
        *,
        expected: JobState,
        identity: FileIdentity,
        extra_attempts: int,
        now: float | None = None,
    ) -> Job | None:
        """Queue a failed or cancelled job again (`whisperd retry`): the same
        job, its next claim a new attempt, with `extra_attempts` more allowed,
        for its source file as it is now (identity), back at its inbox path.
        None if the job is no longer in state `expected`, or another job is
        active for its path."""
        if expected not in (JobState.FAILED, JobState.CANCELLED):
            raise ValueError(f"job {job_id}: only failed or cancelled jobs are retried, not {expected.value}")
        moment = _clock(now)
        with self._writing() as conn:
            job = self._fetch(conn, job_id)
            if job is None or job.state is not expected:
                return None
            other = conn.execute(
                sa.select(JOBS.c.id).where(
                    JOBS.c.inbox == job.spec.inbox,
                    JOBS.c.rel_path == job.spec.rel_path,
                    JOBS.c.state.in_(_ACTIVE_VALUES),
                )
            ).first()
            if other is not None:
                return None
            conn.execute(SOURCE_MOVES.delete().where(SOURCE_MOVES.c.job_id == job_id))
            store_hooks.forsake_owed(
                conn, job_id, "the job was queued again (whisperd retry) before this was made"
            )
            conn.execute(
                JOBS.update()
                .where(JOBS.c.id == job_id, JOBS.c.state == expected.value)
                .values(
                    **_cleared_claim(),
                    state=JobState.QUEUED.value,
                    max_attempts=job.attempts + max(1, extra_attempts),
                    not_before=moment,
                    finished_at=None,
                    disposed_at=None,
                    disposed_to=None,
                    cancel_requested=False,
                    progress=0.0,
                    eta_seconds=None,
                    decoding_started_at=None,
                    decoding_seconds=None,
                    file_device=_to_int64(identity.device),
                    file_inode=_to_int64(identity.inode),
                    file_size=identity.size,
                    file_mtime_ns=identity.mtime_ns,
                    updated_at=moment,
                )
            )
            store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=job.spec.inbox))
            return self._fetch(conn, job_id)

    def pause_inbox(self, inbox: str, *, now: float | None = None) -> bool:
        """Stop workers claiming the queued jobs of `inbox` (running ones
        finish). Kept in the store: it holds across restarts and for every
        host. True if it was not paused already."""

        def pause(conn: Connection) -> bool:
            found = conn.execute(sa.select(PAUSED_INBOXES.c.inbox).where(PAUSED_INBOXES.c.inbox == inbox))
            if found.first() is not None:
                return False
            conn.execute(PAUSED_INBOXES.insert().values(inbox=inbox, paused_at=_clock(now)))
            return True

        return self._write_racing_inserts(pause)

    def resume_inbox(self, inbox: str) -> bool:
        """Let workers claim `inbox`'s jobs again. True if it was paused."""
        with self._writing() as conn:
            return (
                int(conn.execute(PAUSED_INBOXES.delete().where(PAUSED_INBOXES.c.inbox == inbox)).rowcount) > 0
            )

    # ------------------------------------------------------- completion hooks ---

    def set_hook_subscriptions(self, instance: str, hooks: Mapping[str, Sequence[str]]) -> None:
        """The hook kinds (on_done, on_failed, webhook) each inbox of
        `instance` has now: a job of it that ends from then on, on any host,
        owes a delivery to each kind some daemon has."""
        with self._writing() as conn:
            store_hooks.set_subscriptions(conn, instance, hooks)

    def abandon_unsubscribed_hooks(self, *, now: float | None = None) -> int:
        """End failed the owed deliveries whose hook no daemon has any more."""
        with self._writing() as conn:
            return store_hooks.abandon_unsubscribed(conn, JOBS, now=_clock(now))

    def claim_hook_delivery(
        self,
        hooks: Mapping[str, Sequence[str]],
        *,
        lease: float,
        moved_before: float,
        now: float | None = None,
    ) -> HookDelivery | None:
        """The pending delivery due longest among the (inbox, kinds) in
        `hooks` whose job's source has moved (or that is owed since before
        `moved_before`), taken for `lease` seconds with its try counted."""
        moment = _clock(now)
        pairs = store_hooks.due_pairs(JOBS, hooks)
        if not pairs:
            return None
        # Looked for first without the write lock: idle runners poll often.
        with self._reading() as conn:
            query = store_hooks.due_query(JOBS, pairs, now=moment, moved_before=moved_before)
            if conn.execute(query).first() is None:
                return None
        with self._writing() as conn:
            return store_hooks.claim_due(
                conn, JOBS, hooks, now=moment, lease=lease, moved_before=moved_before
            )

    def record_hook_outcome(
        self, delivery: HookDelivery, *, error: str | None, retry_at: float | None, now: float | None = None
    ) -> bool:
        """A try's result: delivered (error None), due again at retry_at, or
        failed. False if the claim no longer held (the try outlived its lease)."""
        with self._writing() as conn:
            return store_hooks.record_outcome(conn, delivery, error=error, retry_at=retry_at, now=_clock(now))

    def hook_deliveries_of(self, job_id: int) -> list[HookDelivery]:
        """Every hook delivery a job's ends owed, oldest first."""
        with self._reading() as conn:
            return store_hooks.deliveries_of(conn, job_id)

    def paused_inboxes(self) -> dict[str, float]:
        """Paused inbox name -> when it was paused (Unix time)."""
        with self._reading() as conn:
            rows = conn.execute(sa.select(PAUSED_INBOXES.c.inbox, PAUSED_INBOXES.c.paused_at)).all()
        return {str(inbox): float(at) for inbox, at in rows}

    # ------------------------------------------------------- deferred files ---

    def defer_file(
        self, spec: JobSpec, identity: FileIdentity, *, waits_for: int, now: float | None = None
    ) -> None:
        """Record that the file `identity` at spec's path waits for job
        `waits_for` (active at that path) to end; replaces what waited there."""
        row = {
            "inbox": spec.inbox,
            "rel_path": spec.rel_path,
            "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
            "file_device": _to_int64(identity.device),
            "file_inode": _to_int64(identity.inode),
            "file_size": identity.size,
            "file_mtime_ns": identity.mtime_ns,
            "waits_for": waits_for,
            "recorded_at": _clock(now),
        }

        def write(conn: Connection) -> None:
            conn.execute(DEFERRED_FILES.delete().where(*_deferral_key(spec)))
            conn.execute(DEFERRED_FILES.insert().values(**row))

        self._write_racing_inserts(write)

    def deferred_files(self, inboxes: Sequence[str], *, ready_only: bool = True) -> list[DeferredFile]:
        """The files waiting in `inboxes`, oldest first; with ready_only, only
        those whose job has ended (or is gone)."""
        query = sa.select(DEFERRED_FILES).where(DEFERRED_FILES.c.inbox.in_(list(inboxes)))
        if ready_only:
            active = sa.select(JOBS.c.id).where(JOBS.c.state.in_(_ACTIVE_VALUES))
            query = query.where(DEFERRED_FILES.c.waits_for.not_in(active.scalar_subquery()))
        with self._reading() as conn:
            rows = conn.execute(query.order_by(DEFERRED_FILES.c.recorded_at)).all()
        return [_deferred_from_row(row) for row in rows]

    def enqueue_deferred(
        self, item: DeferredFile, identity: FileIdentity, *, max_attempts: int, now: float | None = None
    ) -> tuple[Job, bool]:
        """Queue a waiting file (now `identity`) and forget its row, in one
        transaction. If another job is active at the path, the row waits for
        that one instead; if that job is of this very file, the row is done."""
        moment = _clock(now)

        def write(conn: Connection) -> tuple[Job, bool]:
            job, created = self._enqueue_in(conn, item.spec, identity, max_attempts, moment)
            mine = _deferral_key(item.spec, item.identity)
            same_file = (job.identity.device, job.identity.inode) == (identity.device, identity.inode)
            if created or same_file:
                conn.execute(DEFERRED_FILES.delete().where(*mine))
            else:
                conn.execute(DEFERRED_FILES.update().where(*mine).values(waits_for=job.id))
            return job, created

        return self._write_racing_inserts(write)

    def forget_deferred(self, item: DeferredFile) -> bool:
        """Drop a waiting file's row (gone, or replaced again) if it still
        records that file. True if a row was dropped."""
        with self._writing() as conn:
            deleted = conn.execute(DEFERRED_FILES.delete().where(*_deferral_key(item.spec, item.identity)))
            return int(deleted.rowcount) > 0


def _deferral_key(spec: JobSpec, identity: FileIdentity | None = None) -> list[sa.ColumnElement[bool]]:
    """The row of spec's path (and of that very file, when identity is given)."""
    where = [DEFERRED_FILES.c.inbox == spec.inbox, DEFERRED_FILES.c.rel_path == spec.rel_path]
    if identity is not None:
        where += [
            DEFERRED_FILES.c.file_device == _to_int64(identity.device),
            DEFERRED_FILES.c.file_inode == _to_int64(identity.inode),
        ]
    return where


def _deferred_from_row(row: Row[Any]) -> DeferredFile:
    m = row._mapping
    return DeferredFile(
        spec=JobSpec.from_dict(json.loads(m["spec_json"])),
        identity=FileIdentity(
            device=_from_int64(int(m["file_device"])),
            inode=_from_int64(int(m["file_inode"])),
            size=int(m["file_size"]),
            mtime_ns=int(m["file_mtime_ns"]),
        ),
        waits_for=int(m["waits_for"]),
        recorded_at=float(m["recorded_at"]),
    )


def _retried(method: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(method)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> _T:
        return self._with_retry(lambda: method(self, *args, **kwargs))

    return call


# Every public call of the store rides out outages the same way (JobStore._with_retry).
for _name, _method in list(vars(JobStore).items()):
    if not _name.startswith("_") and callable(_method) and _name not in ("close", "failing_fast", "open"):
        setattr(JobStore, _name, _retried(_method))
