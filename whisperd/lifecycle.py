"""The one place an attempt ends.

Whoever sees an attempt end (its worker, the pool after killing or losing a
worker, start-up recovery) calls `Lifecycle.end_attempt`: one fenced store
transition (JobStore.end_attempt, where the rule of the next state
lives), then the file-system consequences of the state reached, then one log
line and one `job_finished` event. Those consequences are `dispose`: partial
outputs removed unless the job is done, the source moved to done/ or failed/
(with NAME.error.txt) or left in the cancel folder, and the store told
(`mark_disposed`). `dispose` is driven by what the store says is still owed and
is idempotent, so the daemon's sweep, start-up recovery, a queued cancel and a
rejection replay it, and a crash at any step converges on the next replay.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from whisperd import crash_points, logs
from whisperd.crash_points import (
    AFTER_NOTE_WRITTEN,
    AFTER_OUTPUTS_REMOVED,
    AFTER_SOURCE_MOVED,
    AFTER_TRANSITION,
    BEFORE_MARK_DISPOSED,
)
from whisperd.errors import OutputError
from whisperd.events import JobFinished, JobRejected, JobRetried, WorkerEvent
from whisperd.files import outputs
from whisperd.files.repeat_names import done_rel_path
from whisperd.jobs import (
    TERMINAL_STATES,
    AttemptEnd,
    AttemptOutcome,
    FileIdentity,
    Job,
    JobState,
)
from whisperd.media import decode as media

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.lifecycle")

# Where the lifecycle reports each attempt's end (the worker's channel, the
# pool's or the daemon's handler).
Emit = Callable[[WorkerEvent], None]


def _no_emit(_event: WorkerEvent) -> None:
    return None


class Lifecycle:
    """Ends attempts and disposes of what an ended job still owes."""

    def __init__(self, store: JobStore, emit: Emit | None = None) -> None:
        self._store = store
        self._emit = emit or _no_emit

    # ----------------------------------------------------------- ending ---

    def end_attempt(
        self,
        job: Job,
        token: str,
        end: AttemptEnd,
        *,
        device: str | None = None,
        duration_seconds: float = 0.0,
        log_as: str | None = None,
        log_fields: Mapping[str, Any] | None = None,
    ) -> JobState | None:
        """End the attempt `token` holds on `job`; returns the state reached,
        or None when the lease was lost (the job is someone else's now).
        `log_as` names the log line instead of the outcome's (recovery)."""
        if end.outcome is not AttemptOutcome.DONE:
            # While the token holds, nobody else writes this job's outputs:
            # a job handed back must not keep half an attempt's files.
            self._remove_outputs(job.id, self._outputs_while_held(job, token))
        state = self._store.end_attempt(job.id, token, end)
        if state is None:
            self.lease_lost(job, end.error, device=device, duration_seconds=duration_seconds)
            return None
        crash_points.reached(AFTER_TRANSITION)
        if state in TERMINAL_STATES:
            after = self._store.get(job.id)
            if after is not None:
                self.dispose_logged(after)
        self._report(
            job,
            state,
            end,
            device=device or job.device or "",
            duration=duration_seconds,
            log_as=log_as,
            extra=log_fields,
        )
        return state

    def lease_lost(
        self,
        job: Job,
        error: str | None,
        *,
        device: str | None = None,
        duration_seconds: float = 0.0,
        audio_seconds: float | None = None,
    ) -> None:
        """An attempt whose claim no longer held: nothing to write, only told."""
        log.warning("job.lease_lost", **logs.job_fields(job), error=error)
        self._finished_event(job, "lease_lost", device or job.device or "", duration_seconds, audio_seconds)

    def _report(
        self,
        job: Job,
        state: JobState,
        end: AttemptEnd,
        *,
        device: str,
        duration: float,
        log_as: str | None,
        extra: Mapping[str, Any] | None,
    ) -> None:
        fields: dict[str, Any] = {
            **logs.job_fields(job),
            "device": device,
            "state": state.value,
            **(extra or {}),
        }
        audio = end.audio_seconds
        outcome = "retry" if state is JobState.QUEUED else state.value
        if state is JobState.QUEUED:
            fields.update(error=end.error, attempt=job.attempts)
            released = end.outcome is AttemptOutcome.RELEASED
            log.warning(log_as or ("job.released" if released else "job.retry"), **fields)
            self._emit(JobRetried(inbox=job.spec.inbox))
        else:
            rtf = duration / audio if audio else None
            fields.update(
                seconds=round(duration, 3), audio_seconds=audio, realtime_factor=rtf, error=end.error
            )
            level = log.warning if state is JobState.FAILED else log.info
            level(log_as or f"job.{state.value}", **fields)
        reason = (end.error or "").removeprefix(f"{job.source}: ")
        rejected = media.reject_kind(reason) if state is JobState.FAILED else None
        if rejected is not None:
            outcome = "rejected"
            self._emit(JobRejected(inbox=job.spec.inbox, reason=rejected))
        self._finished_event(job, outcome, device, duration, audio)

    def _finished_event(
        self, job: Job, outcome: str, device: str, duration: float, audio_seconds: float | None
    ) -> None:
        self._emit(
            JobFinished(
                job_id=job.id,
                inbox=job.spec.inbox,
                outcome=outcome,
                device=device,
                duration_seconds=duration,
                audio_seconds=audio_seconds,
            )
        )

    # --------------------------------------------------------- settling ---

    def dispose_logged(self, job: Job) -> None:
        """dispose(), with a failed move logged (the daemon's sweep retries it)."""
        error = self.dispose(job)
        if error is not None:
            spec = job.spec
            log.warning(
                "job.dispose_failed", job_id=job.id, inbox=spec.inbox, file=spec.rel_path, error=str(error)
            )

    def dispose(self, job: Job) -> OutputError | ValueError | None:
        """Carry out what an ended job still owes the file system, from the
        store's record: remove partial outputs unless done, move the source
        where its end state says (done/, failed/ with NAME.error.txt; a
        cancelled job's file stays in the cancel folder, or moves there when it
        was cancelled by id), then record it moved. Returns why the move failed
        (the source is then still owed), None when nothing is owed any more.
        Safe to repeat after a crash at any step."""
        if job.state not in TERMINAL_STATES or job.disposed_at is not None:
            return None
        if job.state is not JobState.DONE:
            self._remove_outputs(job.id, list(job.outputs))
        crash_points.reached(AFTER_OUTPUTS_REMOVED)
        spec = job.spec
        target = {
            JobState.DONE: spec.done_dir,
            JobState.FAILED: spec.failed_dir,
            JobState.CANCELLED: spec.cancel_dir or None,
        }.get(job.state)
        if target is None:
            return None
        if job.state is JobState.DONE and self._requeued_changed_source(job):
            return None
        rel_path = done_rel_path(job) if job.state is JobState.DONE else spec.rel_path
        moved_to = ""
        if _same_file_still_there(job):
            try:
                moved_to = outputs.move_source(job.source, target, rel_path)
            except (OutputError, ValueError) as exc:
                return exc
        else:
            # Moved before a crash (or by the user into the cancel folder).
            moved_to = _moved_copy(job, target, rel_path) or ""
        crash_points.reached(AFTER_SOURCE_MOVED)
        if job.state is JobState.FAILED:
            _write_note(job, moved_to)
            crash_points.reached(AFTER_NOTE_WRITTEN)
        crash_points.reached(BEFORE_MARK_DISPOSED)
        self._store.mark_disposed(job.id, moved_to)
        return None

    def _outputs_while_held(self, job: Job, token: str) -> list[str]:
        """The outputs this attempt recorded, if its token still holds (else
        they may be the next attempt's, being written now)."""
        current = self._store.get(job.id)
        held = current is not None and current.claim_token == token and current.state is JobState.RUNNING
        return list(current.outputs) if held and current is not None else []

    def _remove_outputs(self, job_id: int, paths: list[str]) -> None:
        """Remove this job's outputs, never a newer job's file of the same name."""
        mine = []
        for path in paths:
            owner = self._store.output_owner_job(path)
            if owner is None or owner[0] == job_id:
                mine.append(path)
        remove_outputs(mine)

    def _requeued_changed_source(self, job: Job) -> bool:
        """A done job's file changed in place after its transcript was made:
        the file stays in the inbox and a new job transcribes its final content."""
        changed = changed_since_done(job)
        if changed is None:
            return False
        again, _new = self._store.enqueue(job.spec, changed, max_attempts=job.max_attempts)
        log.info(
            "job.source_changed_after_done",
            job_id=job.id,
            new_job_id=again.id,
            inbox=job.spec.inbox,
            file=job.spec.rel_path,
        )
        self._store.mark_disposed(job.id, "")
        return True


def remove_outputs(paths: list[str]) -> None:
    """Remove output files and any temp files left for them."""
    for path in paths:
        leftovers = glob.glob(outputs.temp_glob(path))
        for item in [path, *leftovers]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item)


def changed_since_done(job: Job) -> FileIdentity | None:
    """The new identity of a finished job's source that changed in place after
    its transcript was made (same inode, other size or mtime); else None."""
    try:
        now = FileIdentity.of(job.source)
    except OSError:
        return None
    if not now.same_file(job.identity):
        return None
    return now if now != job.identity else None


def _write_note(job: Job, moved_to: str) -> None:
    """NAME.error.txt next to the failed source; a note that cannot be written
    is logged, never raised: the source has moved already and must not be
    retried forever (nor take the caller down)."""
    spec = job.spec
    try:
        outputs.write_error_note(
            spec.failed_dir,
            spec.rel_path,
            job.last_error or "unknown error",
            {
                "job": str(job.id),
                "inbox": spec.inbox,
                "attempts": f"{job.attempts} of {job.max_attempts}",
                "model": spec.model,
                "worker": job.worker or "",
                "moved_to": moved_to or "(source was gone)",
            },
        )
    except (OutputError, ValueError) as exc:
        log.error("job.note_failed", job_id=job.id, inbox=spec.inbox, file=spec.rel_path, error=str(exc))


def _same_file_still_there(job: Job) -> bool:
    try:
        now = FileIdentity.of(job.source)
    except OSError:
        return False
    return now.same_file(job.identity)


def _moved_copy(job: Job, target: str, rel_path: str) -> str | None:
    """Where in `target` the job's own file already lies (same inode and
    content), looked for in the folder its move goes to: a move that happened
    before a crash is found, not counted as a vanished source."""
    folder = os.path.dirname(os.path.join(target, rel_path))
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    for entry in entries:
        if entry.inode() != job.identity.inode:
            continue
        try:
            found = FileIdentity.from_stat(entry.stat(follow_symlinks=False))
        except OSError:
            continue
        if found.device == job.identity.device and found.same_content(job.identity):
            return entry.path
    return None
