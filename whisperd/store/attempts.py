"""Part of the job store: a job's attempts.

The claim (compare-and-set, SKIP LOCKED on PostgreSQL, a lease on the
database's clock, the attempt's record opened), the worker's fenced writes
(heartbeat, device, identity, outputs, decoding start), the one verb that
ends an attempt (end_attempt), lease expiry by the same rule, a cancel
request, and `whisperd retry`'s requeue of an ended job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from whisperd.jobs import (
    TERMINAL_STATES,
    AttemptEnd,
    Claim,
    FileIdentity,
    Job,
    JobState,
)
from whisperd.store import hooks as store_hooks
from whisperd.store import instances as store_instances
from whisperd.store import notify as store_notify
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.database import _lease_clock
from whisperd.store.notify import StoreNotice
from whisperd.store.rows import (
    _attempt_end_values,
    _attempt_started,
    _cleared_claim,
    _clock,
    _identity_columns,
    _job_from_row,
    _lease_expired_end,
    _not_paused,
    _record_outputs,
    _to_int64,
)
from whisperd.store.schema import (
    _ACTIVE_VALUES,
    JOBS,
    SOURCE_MOVES,
)
from whisperd.store.values import HeartbeatReply

# Candidates looked at per claim; more than one only matters if a compare-and-set
# loses a race, which the row locks (PostgreSQL) and BEGIN IMMEDIATE (SQLite) prevent.
CLAIM_CANDIDATES = 8


def _claim_candidates(moment: float, inboxes: Sequence[str] | None, instance: str | None) -> sa.Select[Any]:
    """The ids a claim tries, best first: queued, due, not asked to cancel,
    not paused, of the given inboxes or of those `instance` watches."""
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
    return query


def _requeued_values(job: Job, identity: FileIdentity, extra_attempts: int, now: float) -> dict[str, Any]:
    """The columns of an ended job queued again by `whisperd retry`."""
    return {
        **_cleared_claim(),
        "state": JobState.QUEUED.value,
        "max_attempts": job.attempts + max(1, extra_attempts),
        "not_before": now,
        "finished_at": None,
        "disposed_at": None,
        "disposed_to": None,
        "cancel_requested": False,
        "progress": 0.0,
        "eta_seconds": None,
        "decoding_started_at": None,
        "decoding_seconds": None,
        "file_device": _to_int64(identity.device),
        "file_inode": _to_int64(identity.inode),
        "file_size": identity.size,
        "file_mtime_ns": identity.mtime_ns,
        "updated_at": now,
    }


class AttemptsMixin(StoreBase):
    """Claim, run and end attempts."""

    @outage_retried
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
        query = _claim_candidates(moment, inboxes, instance)
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

    @outage_retried
    def heartbeat(
        self,
        job_id: int,
        token: str,
        *,
        lease_seconds: float,
        progress: float | None = None,
        eta_seconds: float | None = None,
        audio_seconds: float | None = None,
        decoding_started_at: float | None = None,
        now: float | None = None,
    ) -> HeartbeatReply:
        """Extend the lease and record progress (and, once known, when the
        engine began: the ETA and realtime factor count from there; it rides
        on the beat rather than costing the job a commit of its own before
        it decodes); ok=False means the lease is lost."""
        moment = _clock(now)
        values: dict[str, Any] = {"lease_expires": _lease_clock(now) + lease_seconds, "updated_at": moment}
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, progress))
        if eta_seconds is not None:
            values["eta_seconds"] = eta_seconds
        if audio_seconds is not None:
            values["audio_seconds"] = audio_seconds
        if decoding_started_at is not None:
            values["decoding_started_at"] = decoding_started_at
        with self._writing() as conn:
            if not self._fenced_update(conn, job_id, token, values):
                return HeartbeatReply(ok=False, cancel_requested=False)
            cancel = conn.execute(sa.select(JOBS.c.cancel_requested).where(JOBS.c.id == job_id)).scalar()
        return HeartbeatReply(ok=True, cancel_requested=bool(cancel))

    @outage_retried
    def set_identity(
        self, job_id: int, token: str, identity: FileIdentity, *, now: float | None = None
    ) -> bool:
        """Record that a running job's source was replaced since it was queued
        (the worker transcribes the file as it is now)."""
        values = {**_identity_columns(identity), "updated_at": _clock(now)}
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, values)

    @outage_retried
    def set_device(self, job_id: int, token: str, device: str, *, now: float | None = None) -> bool:
        """Record the device a running job really runs on (a CPU fallback)."""
        with self._writing() as conn:
            return self._fenced_update(conn, job_id, token, {"device": device, "updated_at": _clock(now)})

    @outage_retried
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

    @outage_retried
    def end_attempt(
        self, job_id: int, token: str, end: AttemptEnd, *, now: float | None = None
    ) -> JobState | None:
        """End the running attempt `token` holds: the one transition every
        end of an attempt goes through (see jobs.state_after_attempt for the rule).

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
            if not self._fenced_end(conn, job_id, token, values):
                return None
            if end.outputs and state is not JobState.QUEUED:
                _record_outputs(conn, job_id, end.outputs)
            if state is JobState.QUEUED and values["not_before"] <= moment:
                # Due now (a shutdown, a drained device): another host's idle worker may take it.
                store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=job.spec.inbox))
        return state

    @outage_retried
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
                if self._fenced_end(conn, job.id, job.claim_token, values):
                    after = self._fetch(conn, job.id)
                    if after is not None:
                        reclaimed.append(after)
            for inbox in sorted({j.spec.inbox for j in reclaimed if j.state is JobState.QUEUED}):
                store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=inbox))
        return reclaimed

    @outage_retried
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

    @outage_retried
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
                .values(**_requeued_values(job, identity, extra_attempts, moment))
            )
            store_notify.notify(conn, StoreNotice(kind=store_notify.QUEUED, inbox=job.spec.inbox))
            return self._fetch(conn, job_id)
