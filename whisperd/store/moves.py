"""Part of the job store: a finished job's source move.

Whether a finished job's source has moved (done/, failed/, cancel/), the
moves still owed, and the failed attempts at one (`source_moves`): when the
next is due, or why whisperd gave up and the source is stuck.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.jobs import (
    TERMINAL_STATES,
    Job,
)
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.rows import (
    _clock,
    _job_from_row,
)
from whisperd.store.schema import (
    JOBS,
    SOURCE_MOVES,
)


class MovesMixin(StoreBase):
    """Owed and failed source moves."""

    @outage_retried
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

    @outage_retried
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

    @outage_retried
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

    @outage_retried
    def move_attempts(self, job_id: int) -> int:
        """Failed attempts recorded at job_id's owed source move."""
        with self._reading() as conn:
            value = conn.execute(
                sa.select(SOURCE_MOVES.c.attempts).where(SOURCE_MOVES.c.job_id == job_id)
            ).scalar()
        return 0 if value is None else int(value)

    @outage_retried
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

    @outage_retried
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

    @outage_retried
    def forget_move_failures(self, job_id: int | None = None) -> int:
        """Forget failed source moves (of one job, or all): they are tried
        again at the next sweep. Returns how many jobs that concerned."""
        delete = SOURCE_MOVES.delete()
        if job_id is not None:
            delete = delete.where(SOURCE_MOVES.c.job_id == job_id)
        with self._writing() as conn:
            return int(conn.execute(delete).rowcount)

    @outage_retried
    def source_stuck_reason(self, job_id: int) -> str | None:
        """Why whisperd gave up moving this finished job's source (None: it did not)."""
        with self._reading() as conn:
            return conn.execute(
                sa.select(SOURCE_MOVES.c.stuck_reason).where(SOURCE_MOVES.c.job_id == job_id)
            ).scalar()
