"""The daemon loop's slower duties: the
housekeeping pass (expired leases, owed source moves, waiting replacements,
retention, abandoned hooks, the paused-inbox gauge, dead watches, the
watcher's counters), and the guard and counters
that recovery, the sweep and intake share (``Tally``).

Everything here runs in the daemon's main thread, except ``Tally``, which
intake's thread calls too.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from whisperd import logs
from whisperd.config import Config
from whisperd.daemon.disposal import move_owed_source
from whisperd.intake.intake import Intake
from whisperd.jobs import Job, JobState
from whisperd.metrics.registry import Metrics
from whisperd.store import hooks as store_hooks
from whisperd.watch.watcher import Watcher

if TYPE_CHECKING:
    from whisperd.lifecycle import Lifecycle
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.daemon.root")

# A finished job's source is moved by its worker; the daemon's sweep only
# takes over (crash, kill) once the worker has had this long.
DISPOSE_AFTER_SECONDS = 10.0
# Retention: finished jobs deleted per housekeeping pass (one short write
# transaction, so claims and heartbeats never wait on it for long), and the
# free pages handed back to the file system per pass (SQLite).
PRUNE_BATCH = 500
VACUUM_PAGES = 2000


class Tally:
    """What recovery and the sweeps count: jobs whose handling raised (per
    stage), and cancels (each job once, whoever sees it first: the loop or
    intake's thread). The metrics come later than recovery: `attach`."""

    def __init__(self) -> None:
        self._metrics: Metrics | None = None
        # stage -> jobs whose recovery/sweep step raised (see per_job).
        self._handling_errors: dict[str, int] = {}
        # Jobs whose cancel the metrics counted (this daemon's, the CLI's seen in the store).
        self._cancels_counted: set[int] = set()
        self._cancels_lock = threading.Lock()

    def attach(self, metrics: Metrics) -> None:
        """Count from here on into `metrics`, with what recovery counted."""
        self._metrics = metrics
        for stage, count in self._handling_errors.items():
            metrics.job_handling_failed(stage, count)

    def per_job(self, stage: str, job: Job, action: Callable[[], object]) -> None:
        """Run one job's share of recovery or a sweep: whatever it raises is
        logged with the job, counted, and does not stop the others (nor the
        daemon); the next sweep tries that job again."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - one job must not stop recovery or the sweep
            log.error(
                "job.handling_failed",
                stage=stage,
                **logs.job_fields(job),
                error=f"{type(exc).__name__}: {exc}",
            )
            self._handling_errors[stage] = self._handling_errors.get(stage, 0) + 1
            if self._metrics is not None:
                self._metrics.job_handling_failed(stage)

    def count_cancel(self, job: Job, *, was_running: bool) -> None:
        with self._cancels_lock:
            if self._metrics is None or job.id in self._cancels_counted:
                return
            self._cancels_counted.add(job.id)
        self._metrics.job_cancelled(job.spec.inbox, was_running=was_running)


class Housekeeping:
    """The housekeeping pass; the daemon's loop calls it with the parts it works on."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        # watcher.events_seen totals already added to the metrics.
        self._watcher_events_counted: dict[str, int] = {}

    def run(
        self,
        store: JobStore,
        life: Lifecycle,
        *,
        config: Config,
        inboxes: Collection[str],
        started_wall: float,
        metrics: Metrics | None,
        intake: Intake | None,
        watcher: Watcher | None,
    ) -> None:
        """One pass (every HOUSEKEEPING_SECONDS)."""
        for job in store.reclaim_stale():
            log.warning("job.lease_expired", **logs.job_fields(job), state=job.state.value)
        self.dispose_finished(
            store,
            life,
            inboxes=inboxes,
            started_wall=started_wall,
            older_than=DISPOSE_AFTER_SECONDS,
            metrics=metrics,
        )
        if intake is not None:
            intake.check_deferred()  # files waiting for a job that has ended since
        retain(store, config, metrics)
        store.fold_state_counts()  # keeps status and the job gauges O(states)
        abandoned = store.abandon_unsubscribed_hooks()
        if abandoned:
            log.warning("hook.abandoned", deliveries=abandoned, reason=store_hooks.NO_LONGER_CONFIGURED)
        if metrics is not None:
            paused = store.paused_inboxes()
            metrics.set_inboxes_paused({name: name in paused for name in inboxes})
        if watcher is not None:
            self._look_at_watcher(watcher, metrics)

    def dispose_finished(
        self,
        store: JobStore,
        life: Lifecycle,
        *,
        inboxes: Collection[str],
        started_wall: float,
        older_than: float,
        metrics: Metrics | None,
    ) -> None:
        """Finish the owed source moves of this instance's inboxes (another
        host's private sources are not visible here)."""
        for job in store.undisposed(older_than=older_than, inboxes=list(inboxes)):
            if job.state is JobState.CANCELLED and (job.finished_at or 0.0) >= started_wall:
                # A queued job cancelled by another process (`whisperd cancel`).
                self._tally.count_cancel(job, was_running=False)
            self._tally.per_job("dispose", job, functools.partial(move_owed_source, life, store, job))
        if metrics is not None:
            metrics.set_sources_stuck(len(store.stuck_sources()))

    def _look_at_watcher(self, watcher: Watcher, metrics: Metrics | None) -> None:
        for name in watcher.dead_inboxes():
            log.error("watcher.inbox_dead", inbox=name, hint="the folder is gone or its watch died; retrying")
        if metrics is None:
            return
        if watcher.last_rescan is not None:
            metrics.rescan_completed(time.time() - (time.monotonic() - watcher.last_rescan))
        seen = watcher.events_seen
        for kind, total in seen.items():
            metrics.watcher_event(kind, total - self._watcher_events_counted.get(kind, 0))
        self._watcher_events_counted = seen


def retain(store: JobStore, config: Config, metrics: Metrics | None) -> None:
    """Prune one batch of finished jobs past [daemon] keep_finished_*,
    then hand the freed pages back so the file shrinks."""
    settings = config.daemon
    if not settings.keep_finished_days and not settings.keep_finished_jobs:
        return
    pruned = store.prune_finished(
        keep_days=settings.keep_finished_days, keep_jobs=settings.keep_finished_jobs, batch=PRUNE_BATCH
    )
    if pruned:
        free = store.vacuum_free_pages(VACUUM_PAGES)
        log.info("store.pruned", jobs=pruned, free_pages_left=free)
        if metrics is not None:
            metrics.jobs_pruned(pruned)
