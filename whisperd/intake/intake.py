"""Intake: what the watcher hands over becomes jobs in the store.

Intake owns one thread. The watcher's settle thread only puts what it found
(a settled file, a file in a cancel folder, a refused file) on intake's queue
and returns at once, so a store that waits out a held lock or an outage
stalls intake alone, never settling, rescans or the daemon's loop.

Intake's thread queues job specs (a batch per transaction), skips late
sightings, records a new file waiting for the job at its path to end (in the
store: store/deferrals.py) and queues it once that job has ended, cancels the
job of a file renamed away, records refused files, and matches cancel-folder
files to their jobs (intake/cancel_match.py). It never touches the worker pool: it
asks the daemon (IntakeOwner's callables put on the daemon's queue).

An item that raises (a store error after the store's own retries, or any
error about one file) is logged with its file, counted, and kept in intake:
it is tried again RETRY_FIRST_SECONDS later (backing off to RETRY_MAX_SECONDS)
for as long as the file is still the same; the thread never dies of it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from whisperd import logs
from whisperd.config import Config, InboxConfig
from whisperd.errors import StoreUnavailable
from whisperd.intake import renames
from whisperd.intake.cancel_match import match_cancelled_file
from whisperd.jobs import FileIdentity, Job, JobSpec, JobState
from whisperd.watch.rules import REASON_UNSUPPORTED_PREFIX, WatchSpec

if TYPE_CHECKING:
    from whisperd.metrics.registry import Metrics
    from whisperd.store.job_store import JobStore

# The daemon's logger, as before intake had a module: operators filter on it.
log = logs.get_logger("whisperd.daemon.root")

# Files that settle together are queued this many per transaction: one commit
# (one fsync) per batch, while the write lock is never held long enough to
# delay a worker's claim or heartbeat noticeably; workers are woken per batch.
ENQUEUE_BATCH = 200
# A failed item is tried again after this long, doubling up to the maximum.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
THREAD_NAME = "whisperd-intake"

# What an item on intake's queue is about.
SETTLED, CANCEL_FILE, REJECTED = "settled", "cancel_file", "rejected"
CANCEL_JOB, DEFERRED = "cancel_job", "deferred"


@dataclass(frozen=True, kw_only=True)
class IntakeOwner:
    """What intake asks of the daemon. Each call returns at once (from
    intake's thread): the pool's two only put a request on the daemon's queue."""

    # Jobs were queued: wake the idle workers.
    wake_workers: Callable[[], None]
    # A running job was cancelled: tell its worker to stop (if ours runs it).
    stop_running_job: Callable[[int], None]
    # A cancel took effect (counted once per job, whoever sees it first).
    count_cancel: Callable[[Job, bool], None]
    # Settle what an ended job still owes (its source moved where its state
    # says; lifecycle.Lifecycle.dispose_logged).
    dispose: Callable[[Job], None]
    metrics: Metrics | None = None


@dataclass(frozen=True)
class _Settings:
    """The parts of the config intake reads; replaced whole on reload."""

    inboxes: dict[str, InboxConfig]
    default_model: str
    max_attempts: int

    @classmethod
    def of(cls, config: Config) -> _Settings:
        return cls(
            inboxes={i.name: i for i in config.inboxes},
            default_model=config.models.default,
            max_attempts=config.workers.max_attempts,
        )


@dataclass(frozen=True, kw_only=True)
class _Item:
    kind: str
    inbox: str = ""
    files: tuple[tuple[str, FileIdentity], ...] = ()
    reason: str = ""
    job_id: int = 0
    # Tries that failed so far (0: a fresh item).
    failures: int = 0


class Intake:
    """The watcher's callbacks put, intake's thread takes (start / stop / join)."""

    def __init__(self, store: JobStore, config: Config, owner: IntakeOwner, *, running_since: float) -> None:
        self._store = store
        self._settings = _Settings.of(config)
        self._owner = owner
        # When this daemon started (time.time()): cancel_match's "made while it runs".
        self._running_since = running_since
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Fresh items put and not yet handled (wait_idle); retries do not count.
        self._idle = threading.Condition()
        self._pending = 0
        self._deferred_asked = threading.Event()
        # (due on the monotonic clock, item): only intake's thread touches it.
        self._retries: list[tuple[float, _Item]] = []

    # -- owner's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        self.check_deferred()  # files that waited when the daemon last stopped

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the item in hand (a store call gives up once the daemon is
        stopping) and end the thread; what is still queued is dropped: the
        next start's scan finds those files again."""
        self._stopping.set()
        self._queue.put(None)
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("intake.stop_timed_out", seconds=timeout)

    def set_config(self, config: Config) -> None:
        """Reload: items handled from now on use the new inboxes and settings."""
        self._settings = _Settings.of(config)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every item put so far has been handled once (READY
        promises the files found at start are jobs). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def check_deferred(self) -> None:
        """Queue the waiting files whose job has ended (housekeeping asks)."""
        if not self._deferred_asked.is_set():
            self._deferred_asked.set()
            self._put(_Item(kind=DEFERRED))

    def cancel_job(self, job_id: int, *, reason: str) -> None:
        self._put(_Item(kind=CANCEL_JOB, job_id=job_id, reason=reason))

    # -- the watcher's callbacks (its settle thread): put and return ----------------

    def on_settled(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        self.on_settled_many(spec, [(path, identity)])

    def on_settled_many(self, spec: WatchSpec, files: list[tuple[str, FileIdentity]]) -> None:
        self._received(SETTLED, spec, [path for path, _ in files])
        self._put(_Item(kind=SETTLED, inbox=spec.name, files=tuple(files)))

    def on_cancel(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        self._received(CANCEL_FILE, spec, [path])
        self._put(_Item(kind=CANCEL_FILE, inbox=spec.name, files=((path, identity),)))

    def on_rejected(self, spec: WatchSpec, path: str, reason: str) -> None:
        self._received(REJECTED, spec, [path])
        self._put(_Item(kind=REJECTED, inbox=spec.name, files=((path, _NO_IDENTITY),), reason=reason))

    @staticmethod
    def _received(kind: str, spec: WatchSpec, paths: Sequence[str]) -> None:
        first = os.path.basename(paths[0]) if paths else None
        log.debug("intake.received", kind=kind, inbox=spec.name, files=len(paths), first=first)

    def _put(self, item: _Item) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    # -- intake's thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            try:
                self._handle(item)
            finally:
                if not item.failures:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()

    def _next(self) -> _Item | None:
        """The next item: a retry now due, else what the queue brings; None
        once stopping. Waits on the queue (until the next retry is due)."""
        while not self._stopping.is_set():
            now = time.monotonic()
            if self._retries and self._retries[0][0] <= now:
                return self._retries.pop(0)[1]
            timeout = self._retries[0][0] - now if self._retries else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is not None:
                return item
        return None

    def _handle(self, item: _Item) -> None:
        handlers: dict[str, Callable[[_Item], None]] = {
            SETTLED: self._settled,
            CANCEL_FILE: self._cancel_file,
            REJECTED: self._rejected,
            CANCEL_JOB: self._cancel_asked,
            DEFERRED: lambda _it: self._enqueue_deferred(),
        }
        if item.kind == DEFERRED:
            self._deferred_asked.clear()  # a later ask queues another look
        try:
            handlers[item.kind](item)
        except Exception as exc:  # noqa: BLE001 - one file must not stop intake
            if self._stopping.is_set() and isinstance(exc, StoreUnavailable):
                return  # the store gave up because the daemon stops; the next start finds the file
            self._failed(item, exc)

    def _failed(self, item: _Item, exc: Exception) -> None:
        """Log with the file, count, and keep the item for a later try (a
        batch is split: each file is tried again on its own)."""
        for path, _identity in item.files or (("", _NO_IDENTITY),):
            log.error(
                "job.handling_failed",
                stage=f"intake_{item.kind}",
                inbox=item.inbox,
                file=os.path.basename(path) if path else None,
                path=path or None,
                job_id=item.job_id or None,
                error=f"{type(exc).__name__}: {exc}",
            )
            if self._owner.metrics is not None:
                self._owner.metrics.job_handling_failed(f"intake_{item.kind}")
        if item.kind == DEFERRED:
            return  # the next housekeeping pass asks again
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0**item.failures)
        due = time.monotonic() + delay
        parts = [replace(item, files=(one,)) for one in item.files] if len(item.files) > 1 else [item]
        for part in parts:
            self._retries.append((due, replace(part, failures=item.failures + 1)))
        self._retries.sort(key=lambda entry: entry[0])

    # -- settled files ------------------------------------------------------------------

    def _settled(self, item: _Item) -> None:
        settings = self._settings
        inbox = settings.inboxes.get(item.inbox)
        if inbox is None:
            return  # removed by a reload meanwhile
        files = list(item.files)
        if item.failures:
            files = [(path, identity) for path, identity in files if _still_delivered(path, identity)]
        for first in range(0, len(files), ENQUEUE_BATCH):
            self._enqueue_batch(inbox, settings, files[first : first + ENQUEUE_BATCH])

    def _enqueue_batch(
        self, inbox: InboxConfig, settings: _Settings, files: list[tuple[str, FileIdentity]]
    ) -> None:
        store = self._store
        items = [
            (
                inbox.job_spec(os.path.relpath(path, inbox.path), settings.default_model),
                _own_identity(path, identity),
            )
            for path, identity in files
        ]
        queued = store.enqueue_many(items, max_attempts=settings.max_attempts, skip_moved_twins=True)
        queued = [self._unless_seen_late(item, result) for item, result in zip(items, queued, strict=True)]
        self._defer_replacements(items, queued)
        created = [job for job, is_new in queued if is_new]
        for job in created:
            self._note_queued(job)
        self._cancel_renamed_away(created)
        if created:
            self._owner.wake_workers()

    def _unless_seen_late(
        self, item: tuple[JobSpec, FileIdentity], result: tuple[Job, bool]
    ) -> tuple[Job, bool]:
        """A file whose path's last job moved this very file out: on a shared
        inbox, another host ran it while this one was still looking (a late
        sighting, skipped quietly), unless the file is back in the inbox (put
        back by someone: a new job)."""
        spec, identity = item
        job, is_new = result
        if is_new or job.state.is_active or job.disposed_at is None or job.identity != identity:
            return result
        if _still(spec.source, identity):
            return self._store.enqueue(spec, identity, max_attempts=self._settings.max_attempts)
        log.info(
            "job.seen_late",
            inbox=spec.inbox,
            file=spec.rel_path,
            job_id=job.id,
            state=job.state.value,
            hint="another instance already ran this file and moved it out; no job queued",
        )
        return result

    def _defer_replacements(
        self, items: list[tuple[JobSpec, FileIdentity]], queued: list[tuple[Job, bool]]
    ) -> None:
        """A new file at the path of a job still active (the old one was
        replaced): the store records that it waits; it gets its own job once
        that job has ended (_enqueue_deferred)."""
        for (spec, identity), (job, is_new) in zip(items, queued, strict=True):
            if is_new or not job.state.is_active or job.identity.same_file(identity):
                continue
            self._store.defer_file(spec, identity, waits_for=job.id)
            log.info("job.replacement_waits", inbox=spec.inbox, file=spec.rel_path, waits_for=job.id)

    def _enqueue_deferred(self) -> None:
        """Queue each waiting file whose job has ended, if it is still there
        and still the same file (gone, or replaced again: the watcher reports
        the newer one). One file's error does not stop the others."""
        store = self._store
        for item in store.deferred_files(list(self._settings.inboxes)):
            try:
                current: FileIdentity | None = FileIdentity.of(item.spec.source)
            except OSError:
                current = None
            try:
                if current is None or not current.same_file(item.identity):
                    store.forget_deferred(item)
                    continue
                job, created = store.enqueue_deferred(item, current, max_attempts=self._settings.max_attempts)
            except Exception as exc:  # the next housekeeping pass tries again
                if self._stopping.is_set():
                    raise
                path = item.spec.source
                self._failed(_Item(kind=DEFERRED, inbox=item.spec.inbox, files=((path, item.identity),)), exc)
                continue
            if created:
                self._note_queued(job)
                self._owner.wake_workers()

    def _cancel_renamed_away(self, created: list[Job]) -> None:
        """A new job's file was queued before under another name: that job is
        cancelled, not left to fail as vanished (intake/renames.py). One store read
        per batch: 2,000 files dropped at once are 10 reads, not 2,000."""
        for old, new in renames.renamed_away(self._store, created):
            self._cancel(old.id, reason=renames.rename_reason(new), seen=old)

    def _note_queued(self, job: Job) -> None:
        spec = job.spec
        log.info("job.queued", **logs.job_fields(job), model=spec.model)
        if self._owner.metrics is not None:
            self._owner.metrics.job_queued(spec.inbox)

    # -- cancels ---------------------------------------------------------------------------

    def _cancel_asked(self, item: _Item) -> None:
        self._cancel(item.job_id, reason=item.reason)

    def _cancel_file(self, item: _Item) -> None:
        ((path, identity),) = item.files
        jobs = match_cancelled_file(
            self._store, item.inbox, path, identity, running_since=self._running_since
        )
        if not jobs:
            log.info(
                "cancel.no_active_job",
                inbox=item.inbox,
                file=os.path.basename(path),
                hint="nothing queued or running matches this file (already done, failed or unknown)",
            )
            return
        for job in jobs:
            self._cancel(job.id, reason=f"moved to the cancel folder: {os.path.basename(path)}", seen=job)

    def _cancel(self, job_id: int, *, reason: str, seen: Job | None = None) -> Job | None:
        """Cancel a job. One `seen` running is told to stop before the store
        write, which may wait out a held lock: the worker stops at once and
        the store learns the end state when it can."""
        told = seen is not None and seen.state is JobState.RUNNING
        if told:
            assert seen is not None
            self._tell_running(seen)
        job = self._store.request_cancel(job_id, reason=reason)
        if job is None:
            return None
        if told and job.state in (JobState.RUNNING, JobState.CANCELLED):
            self._owner.count_cancel(job, True)  # it ended (or ends) cancelled while running
        elif job.state is JobState.CANCELLED:
            self._owner.dispose(job)  # logged once its file is where it belongs, as every end is
            log.info("job.cancelled", **logs.job_fields(job), phase="queued")
            self._owner.count_cancel(job, False)
        elif job.state is JobState.RUNNING and not told:
            self._tell_running(job)
            self._owner.count_cancel(job, True)
        return job

    def _tell_running(self, job: Job) -> None:
        log.info("job.cancelling", **logs.job_fields(job))
        self._owner.stop_running_job(job.id)

    # -- refused files ---------------------------------------------------------------------

    def _rejected(self, item: _Item) -> None:
        settings = self._settings
        inbox = settings.inboxes.get(item.inbox)
        ((path, _none),) = item.files
        if inbox is None:
            return
        try:
            identity = FileIdentity.of(path)
        except OSError:
            return
        store, reason = self._store, item.reason
        unsupported = reason.startswith(REASON_UNSUPPORTED_PREFIX)
        if unsupported and _already_ignored(store, path, identity, reason):
            return  # reported before (an earlier run): once is enough
        rel_path = os.path.relpath(path, inbox.path)
        job = store.record_rejected(inbox.job_spec(rel_path, settings.default_model), identity, reason=reason)
        log.warning("job.rejected", **logs.job_fields(job), reason=reason)
        if self._owner.metrics is not None:
            self._owner.metrics.job_rejected(
                inbox.name, "unsupported_extension" if unsupported else "symlink"
            )
        if unsupported:
            # Not ours to move: the file stays; `whisperd status` lists it as ignored.
            store.mark_disposed(job.id, "")
            return
        self._owner.dispose(job)


# A refused file's item carries no identity (intake looks the file up itself).
_NO_IDENTITY = FileIdentity(device=0, inode=0, size=0, mtime_ns=0)


def _still(path: str, identity: FileIdentity) -> bool:
    """Whether `path` still holds exactly that file (content included)."""
    try:
        return FileIdentity.of(path) == identity
    except OSError:
        return False


def _still_delivered(path: str, identity: FileIdentity) -> bool:
    """Whether a file the watcher handed over is still there as it was (the
    watcher gave a link's target's identity or the link's own)."""
    try:
        return identity in (FileIdentity.of(path), FileIdentity.from_stat(os.stat(path)))
    except OSError:
        return False


def _already_ignored(store: JobStore, path: str, identity: FileIdentity, reason: str) -> bool:
    return any(
        job.last_error == reason and job.identity.same_file(identity) for job in store.find_by_source(path)
    )


def _own_identity(path: str, identity: FileIdentity) -> FileIdentity:
    """A symbolic link is its own job's file: the link is what moves to
    done/, so the job records the link's identity, not its target's."""
    if os.path.islink(path):
        try:
            return FileIdentity.of(path)
        except OSError:
            return identity
    return identity
