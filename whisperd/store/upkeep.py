"""Part of the job store: upkeep and what the store learns.

Retention (finished jobs pruned in batches, never an active one or one
still owing a move or a hook), SQLite's incremental vacuum, the realtime
factor of earlier done jobs (the ETA before progress moves), and how much
device memory a model took.
"""

from __future__ import annotations

import json
import statistics

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.jobs import (
    TERMINAL_STATES,
    JobSpec,
    JobState,
)
from whisperd.store import counts as store_counts
from whisperd.store import hooks as store_hooks
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.rows import (
    _clock,
    _finished_and_moved,
)
from whisperd.store.schema import (
    JOB_ATTEMPTS,
    JOB_OUTPUTS,
    JOBS,
    MODEL_MEMORY,
    SOURCE_MOVES,
)


class UpkeepMixin(StoreBase):
    """Retention, vacuum, realtime factor, model memory."""

    @outage_retried
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

    @outage_retried
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

    @outage_retried
    def model_memory(self, model: str, device_kind: str) -> int | None:
        query = sa.select(MODEL_MEMORY.c.bytes).where(
            MODEL_MEMORY.c.model == model, MODEL_MEMORY.c.device_kind == device_kind
        )
        with self._reading() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else int(value)

    @outage_retried
    def fold_state_counts(self) -> int:
        """Fold the state counts' deltas into their totals (store/counts.py),
        keeping counts() cheap; returns how many were folded."""
        with self._writing() as conn:
            return store_counts.fold(conn)

    @outage_retried
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

    @outage_retried
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

    @outage_retried
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
