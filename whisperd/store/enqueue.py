"""Part of the job store: files becoming jobs.

One queued job per file of an inbox (the partial unique index), many files
in one transaction, a file whose finished job still owes its move or that
another host already moved out, a refused file recorded as failed, and a
waiting file queued once its path is free.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.errors import WhisperdError
from whisperd.jobs import (
    TERMINAL_STATES,
    FileIdentity,
    Job,
    JobSpec,
    JobState,
)
from whisperd.store import notify as store_notify
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.notify import StoreNotice
from whisperd.store.rows import (
    _clock,
    _deferral_key,
    _job_from_row,
    _to_int64,
    new_row,
)
from whisperd.store.schema import (
    _ACTIVE_VALUES,
    DEFERRED_FILES,
    JOBS,
)
from whisperd.store.values import DeferredFile


class EnqueueMixin(StoreBase):
    """Queue jobs: intake's writes."""

    @outage_retried
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

    @outage_retried
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
                **new_row(spec, identity, now), state=JobState.QUEUED.value, max_attempts=max_attempts
            )
        )
        job_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        job = None if job_id is None else self._fetch(conn, int(job_id))
        if job is None:
            raise WhisperdError(f"{self._where}: inserted job for {spec.source} cannot be read back")
        store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=spec.inbox))
        return job, True

    @outage_retried
    def record_rejected(
        self, spec: JobSpec, identity: FileIdentity, *, reason: str, now: float | None = None
    ) -> Job:
        """A file refused before it became a job (a symlink, ...): recorded as
        a failed job so its reason is in the store like any other failure."""
        moment = _clock(now)
        with self._writing() as conn:
            result = conn.execute(
                JOBS.insert().values(
                    **new_row(spec, identity, moment),
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

    @outage_retried
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
            same_file = job.identity.same_file(identity)
            if created or same_file:
                conn.execute(DEFERRED_FILES.delete().where(*mine))
            else:
                conn.execute(DEFERRED_FILES.update().where(*mine).values(waits_for=job.id))
            return job, created

        return self._write_racing_inserts(write)
