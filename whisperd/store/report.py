"""What the reading commands report about jobs.

The JSON documents of `status --json`, `jobs --json` and `show --json`, with
stable field names (README "Machine-readable output" lists them), and where a
job's source file is now. Only this module decides those names; the text
output of cli/commands.py and cli/operator.py is built from the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from whisperd.jobs import FileIdentity, Job, JobState
from whisperd.store.values import Attempt, HookDelivery  # plain values: no database driver loaded

# Bumped only when a field is removed or changes meaning (new fields may appear).
JSON_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SourcePlace:
    """Where a job's source file is now."""

    # inbox (queued, running, or its move is owed), done, failed, cancel, or
    # gone (deleted or moved away by someone else).
    where: str
    # Its path now; None when gone.
    path: str | None


def _is_jobs_file(path: str, job: Job) -> bool:
    """Whether `path` is the job's file (FileIdentity.same_file), not another of its name."""
    try:
        return FileIdentity.of(path).same_file(job.identity)
    except OSError:
        return False


def _folder_of(path: str, job: Job) -> str:
    spec = job.spec
    for name, folder in (("done", spec.done_dir), ("failed", spec.failed_dir), ("cancel", spec.cancel_dir)):
        if folder and os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(
            folder
        ):
            return name
    return "inbox"


def source_place(job: Job) -> SourcePlace:
    """Where the source is now: as the store recorded its move, checked on disk."""
    if job.state.is_active or job.disposed_at is None:
        # Not moved yet (a finished job's move is owed, or it is stuck there).
        return SourcePlace(where="inbox", path=job.source) if os.path.lexists(job.source) else _gone()
    if job.disposed_to:
        if os.path.lexists(job.disposed_to):
            return SourcePlace(where=_folder_of(job.disposed_to, job), path=job.disposed_to)
        return _gone()
    # Moved away before the job ended: a cancel by moving the file into cancel/.
    if job.state is JobState.CANCELLED and job.spec.cancel_dir:
        candidate = os.path.join(job.spec.cancel_dir, job.spec.rel_path)
        if _is_jobs_file(candidate, job):
            return SourcePlace(where="cancel", path=candidate)
    return _gone()


def _gone() -> SourcePlace:
    return SourcePlace(where="gone", path=None)


def took_seconds(job: Job) -> float | None:
    """Wall time of the job's last attempt, once it ended."""
    if job.started_at is None or job.finished_at is None:
        return None
    return max(0.0, job.finished_at - job.started_at)


def realtime_factor(job: Job) -> float | None:
    """Processing seconds per second of audio (below 1: faster than real time)."""
    took = took_seconds(job)
    if took is None or not job.audio_seconds:
        return None
    return took / job.audio_seconds


def decoding_realtime_factor(job: Job) -> float | None:
    """Engine seconds per second of audio of a done job: its model's speed on
    its device, without the model load, audio decode and output writing."""
    if job.decoding_seconds is None or not job.audio_seconds:
        return None
    return job.decoding_seconds / job.audio_seconds


def job_document(job: Job) -> dict[str, Any]:
    """One job, as every --json output shows it. Times are Unix seconds."""
    place = source_place(job)
    return {
        "id": job.id,
        "state": job.state.value,
        "inbox": job.spec.inbox,
        "file": job.spec.rel_path,
        "source": job.source,
        "source_now": place.path,
        "source_where": place.where,
        "model": job.spec.model,
        "priority": job.spec.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "worker": job.worker,
        "device": job.device,
        "progress": job.progress,
        "eta_seconds": job.eta_seconds,
        "audio_seconds": job.audio_seconds,
        "took_seconds": took_seconds(job),
        "realtime_factor": realtime_factor(job),
        "decoding_started_at": job.decoding_started_at,
        "decoding_seconds": job.decoding_seconds,
        "decoding_realtime_factor": decoding_realtime_factor(job),
        "error": job.last_error,
        "cancel_requested": job.cancel_requested,
        "outputs": list(job.outputs),
    }


def attempt_document(attempt: Attempt, *, counted: bool = True) -> dict[str, Any]:
    seconds = None if attempt.ended_at is None else max(0.0, attempt.ended_at - attempt.started_at)
    return {
        "counted": counted,
        "attempt": attempt.number,
        "worker": attempt.worker,
        "device": attempt.device,
        "started_at": attempt.started_at,
        "ended_at": attempt.ended_at,
        "seconds": seconds,
        "outcome": attempt.outcome or "running",
        "error": attempt.error,
    }


def hook_document(delivery: HookDelivery) -> dict[str, Any]:
    return {
        "kind": delivery.kind,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at if delivery.state == "pending" else None,
        "delivered_at": delivery.delivered_at,
        "error": delivery.last_error,
    }


def _history(attempts: list[Attempt]) -> list[dict[str, Any]]:
    """Every attempt, oldest first. One handed back uncounted (a shutdown,
    a drained device) is followed by another of the same number: it says so."""
    return [
        attempt_document(a, counted=not (n + 1 < len(attempts) and attempts[n + 1].number == a.number))
        for n, a in enumerate(attempts)
    ]


def show_document(
    job: Job, attempts: list[Attempt], stuck_reason: str | None, hooks: list[HookDelivery]
) -> dict[str, Any]:
    """`whisperd show ID --json` (and what completion hooks get): the job,
    every attempt, why its source is stuck, its hook deliveries."""
    return {
        "version": JSON_FORMAT_VERSION,
        "job": job_document(job),
        "history": _history(attempts),
        "source_stuck_reason": stuck_reason,
        "hooks": [hook_document(d) for d in hooks],
    }
