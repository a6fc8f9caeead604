"""What the daemon shows of itself: the
read-only views the metrics read at scrape time (job counts, claimable jobs,
running jobs, the pool's workers), the metrics registry built on them, and
the status line systemd shows.

A scrape runs in a metrics connection thread: every view reads the store
failing fast (a scrape must not wait out an outage) and reads the daemon's
store and pool once, through getters, since stop() drops them meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from whisperd import __version__
from whisperd.devices.probe import DeviceProbe
from whisperd.jobs import JobState
from whisperd.metrics.registry import Metrics
from whisperd.metrics.state import RunningJobView, WorkerView
from whisperd.store.job_store import JobStore
from whisperd.workers.pool import WorkerPool


def store_job_counts(store: JobStore) -> dict[str, int]:
    """Jobs per state, as the metrics read them at scrape time."""
    return {state.value: n for state, n in store.counts().items()}


def store_running_jobs(store: JobStore, *, instance: str | None = None) -> list[RunningJobView]:
    """The running jobs, as the metrics read them at scrape time: only those
    of `instance`'s workers when given, so that each daemon exports its own
    (their devices are its devices) and a sum over instances counts each once."""
    prefix = None if instance is None else f"{instance}/"
    return [
        RunningJobView(
            job_id=j.id,
            inbox=j.spec.inbox,
            device=j.device or "",
            progress=j.progress,
            eta_seconds=j.eta_seconds,
        )
        for j in store.list_jobs(states=[JobState.RUNNING], limit=10_000)
        if prefix is None or (j.worker or "").startswith(prefix)
    ]


def status_line(store: JobStore | None) -> str:
    """systemd's STATUS= line: the jobs per state, or why there are none to show."""
    if store is None:
        return "starting"
    if not store.health.up:
        return f"store unreachable: {store.health.reason}"
    counts = store.counts()
    return ", ".join(f"{state.value} {counts.get(state, 0)}" for state in JobState)


class StatusViews:
    """The metrics' scrape-time callbacks for one daemon."""

    def __init__(
        self,
        *,
        instance: str,
        store: Callable[[], JobStore | None],
        pool: Callable[[], WorkerPool | None],
        inboxes: Callable[[], Sequence[str]],
    ) -> None:
        self._instance = instance
        self._store = store
        self._pool = pool
        self._inboxes = inboxes

    def job_counts(self) -> dict[str, int]:
        store = self._store()
        if store is None:
            return {}
        with store.failing_fast():  # a scrape must not wait out an outage
            return store_job_counts(store)

    def claimable_jobs(self) -> int:
        store = self._store()
        if store is None:
            return 0
        with store.failing_fast():
            return store.claimable_count(list(self._inboxes()))

    def running_jobs(self) -> list[RunningJobView]:
        store = self._store()
        if store is None:
            return []
        with store.failing_fast():
            return store_running_jobs(store, instance=self._instance)

    def workers(self) -> Sequence[WorkerView]:
        pool = self._pool()  # read once: stop() drops it while a scrape may run
        return () if pool is None else pool.workers()


def make_metrics(views: StatusViews, *, probe: DeviceProbe, instance: str) -> Metrics:
    """The daemon's metrics registry, reading `views` and `probe` at scrape time."""
    return Metrics(
        job_counts=views.job_counts,
        claimable_jobs=views.claimable_jobs,
        running_jobs=views.running_jobs,
        devices=probe,
        version=__version__,
        workers=views.workers,
        instance=instance,
    )
