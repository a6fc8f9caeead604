"""Part of the job store: its tables and their history.

The schema as each migration left it: MIGRATIONS brings a database up one
version at a time (append, never edit: a database made by any earlier
whisperd opens unchanged), and JOBS, JOB_OUTPUTS, ... are the tables as the
current code reads and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.jobs import ACTIVE_STATES
from whisperd.store import counts as store_counts
from whisperd.store import deferrals as store_deferrals
from whisperd.store import hooks as store_hooks
from whisperd.store import instances as store_instances

# A migration brings the schema up by one version inside the open() transaction.
Migration = Callable[[Connection], None]

_ACTIVE_VALUES = [s.value for s in ACTIVE_STATES]


# ---------------------------------------------------------------- schema v1 ---


def _v1_job_columns() -> list[sa.Column[Any]]:
    """The columns of the version 1 jobs table (new objects at each call:
    a column belongs to one table)."""
    return [
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
    ]


def _v1_model_memory(metadata: sa.MetaData) -> sa.Table:
    """How much device memory a model took on a kind of device (version 1)."""
    return sa.Table(
        "model_memory",
        metadata,
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("device_kind", sa.Text, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("measured_at", sa.Float, nullable=False),
    )


def _define_v1(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The version 1 tables. Migration 1 creates exactly these; when a later
    version changes a table, migration 1 must keep using this definition."""
    jobs = sa.Table("jobs", metadata, *_v1_job_columns())
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

    model_memory = _v1_model_memory(metadata)
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
    # (store/instances.py): one name per live daemon, claims by affinity.
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
    # Completion hooks (store/hooks.py): the deliveries each job end owes,
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
    # A new file waiting for the job at its path to end (store/deferrals.py):
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
