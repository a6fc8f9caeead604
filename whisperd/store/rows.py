"""Part of the job store: rows and the rules that fill them.

A stored row <-> Job and DeferredFile, the identity columns (unsigned 64-bit
st_dev/st_ino kept in signed BIGINT), a new job's row, and the rule of the
next state's columns when an attempt ends (jobs.state_after_attempt, _attempt_end_values,
_lease_expired_end), written once for every verb that ends one; the attempt
records and the clauses several verbs share.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from whisperd.jobs import (
    TERMINAL_STATES,
    AttemptEnd,
    AttemptOutcome,
    FileIdentity,
    Job,
    JobSpec,
    JobState,
    state_after_attempt,
)
from whisperd.store import hooks as store_hooks
from whisperd.store.schema import DEFERRED_FILES, JOB_ATTEMPTS, JOB_OUTPUTS, JOBS, PAUSED_INBOXES
from whisperd.store.values import DeferredFile

_UINT64 = 1 << 64
_INT64_MAX = (1 << 63) - 1


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


def _attempt_end_values(job: Job, end: AttemptEnd, now: float) -> tuple[JobState, dict[str, Any]]:
    """The state `end` takes `job` to, and the columns that say so."""
    state = state_after_attempt(job, end.outcome)
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
    if end.decoding_started_at is not None:
        values["decoding_started_at"] = end.decoding_started_at
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


def _identity_from_row(m: Any) -> FileIdentity:
    """The inverse of _identity_columns, from a row's mapping."""
    return FileIdentity(
        device=_from_int64(int(m["file_device"])),
        inode=_from_int64(int(m["file_inode"])),
        size=int(m["file_size"]),
        mtime_ns=int(m["file_mtime_ns"]),
    )


def _job_from_row(row: Row[Any]) -> Job:
    """The one place a stored row becomes a Job."""
    m = row._mapping
    return Job(
        id=int(m["id"]),
        spec=JobSpec.from_dict(json.loads(m["spec_json"])),
        identity=_identity_from_row(m),
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


def new_row(spec: JobSpec, identity: FileIdentity, now: float) -> dict[str, Any]:
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
        identity=_identity_from_row(m),
        waits_for=int(m["waits_for"]),
        recorded_at=float(m["recorded_at"]),
    )
