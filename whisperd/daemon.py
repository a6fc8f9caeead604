"""The daemon: the composition root (layer L4).

Builds every part from the Config, starts them in order (store, recovery,
metrics, workers, watcher, READY), runs the supervision loop, and stops them
in reverse. Signal handlers only set events; the loop acts on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from whisperd import __version__, logs, outputs
from whisperd.config import Config, InboxConfig, load_config
from whisperd.errors import ConfigError, WhisperdError
from whisperd.gpu_pool import HealthPolicy, Slot, WorkerPool, default_cpu_threads, plan_slots
from whisperd.jobs import FileIdentity, Job, JobSpec, JobState
from whisperd.metrics import Metrics, MetricsServer, RunningJobView
from whisperd.nvml import DeviceProbe, NvmlProbe
from whisperd.queue_db import JobStore
from whisperd.sdnotify import Notifier
from whisperd.watcher import Watcher, WatchSpec
from whisperd.worker import WorkerSettings, dispose_source, worker_id_for

log = logs.get_logger("whisperd.daemon")

# How often the loop runs, and how often its slower duties run.
LOOP_SECONDS = 0.2
HOUSEKEEPING_SECONDS = 5.0
# A finished job's source is moved by its worker; the daemon's sweep only
# takes over (crash, kill) once the worker has had this long.
DISPOSE_AFTER_SECONDS = 10.0
# Files that settle together are queued this many per transaction: one commit
# (one fsync) per batch, while the write lock is never held long enough to
# delay a worker's claim or heartbeat noticeably; workers are woken per batch.
ENQUEUE_BATCH = 200
# READY waits for the files found at start to become jobs: settle_seconds
# plus this much for looking at and queueing them; after it, READY anyway.
START_SCAN_MARGIN_SECONDS = 10.0
# While running jobs drain on stop, ask systemd for more time at most this
# often, each time for what is left of the grace period plus the margin.
EXTEND_TIMEOUT_EVERY_SECONDS = 1.0
EXTEND_TIMEOUT_MARGIN_SECONDS = 5.0
# Settings a reload applies at once (to jobs queued from then on). Every other
# setting outside the [[inbox]] tables takes effect at the next restart.
RELOADABLE_SETTINGS = frozenset({"daemon.shutdown_grace_seconds", "models.default", "workers.max_attempts"})


def watchdog_ping_seconds(watchdog_timeout: float | None) -> float:
    """How often to send WATCHDOG=1: half of systemd's WatchdogSec, so one
    late ping is not fatal (never less often than housekeeping runs)."""
    if watchdog_timeout is None:
        return HOUSEKEEPING_SECONDS
    return min(HOUSEKEEPING_SECONDS, watchdog_timeout / 2)


@dataclass(frozen=True, kw_only=True)
class _Signals:
    stop: threading.Event
    force: threading.Event
    reload: threading.Event


class Daemon:
    """whisperd run."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        probe: DeviceProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._notifier = notifier or Notifier()
        self._probe: DeviceProbe = probe or NvmlProbe()
        self._clock = clock
        self._signals = _Signals(stop=threading.Event(), force=threading.Event(), reload=threading.Event())
        self._inboxes: dict[str, InboxConfig] = {i.name: i for i in config.inboxes}
        self._lock_file: IO[str] | None = None
        self._store: JobStore | None = None
        self._pool: WorkerPool | None = None
        self._watcher: Watcher | None = None
        self._metrics: Metrics | None = None
        self._server: MetricsServer | None = None
        self._next_housekeeping = 0.0
        self._next_watchdog = 0.0
        self._watchdog_every = watchdog_ping_seconds(self._notifier.watchdog_interval())
        self._last_extend = float("-inf")
        # watcher.events_seen totals already added to the metrics.
        self._watcher_events_counted: dict[str, int] = {}
        self._host = socket.gethostname()
        # (inbox, rel_path) -> a settled file waiting for the job at its path to end.
        self._deferred: dict[tuple[str, str], tuple[JobSpec, FileIdentity]] = {}
        self._deferred_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Start, supervise until asked to stop, stop. Returns the exit code."""
        self._install_signal_handlers()
        try:
            self.start()
        except WhisperdError as exc:
            log.error("daemon.start_failed", error=str(exc))
            self.stop()
            return 1
        try:
            while not self._signals.stop.wait(LOOP_SECONDS):
                self.loop_once()
        finally:
            self.stop()
        return 0

    def start(self) -> None:
        config = self._config
        self._make_folders(config.inboxes)
        self._lock_state_dir()
        self._store = store = JobStore.open(config.database_url)
        self._recover(store)
        self._metrics = Metrics(
            job_counts=self._job_counts,
            running_jobs=self._running_jobs,
            devices=self._probe,
            version=__version__,
        )
        if config.metrics.enabled:
            self._server = MetricsServer(self._metrics, host=config.metrics.host, port=config.metrics.port)
            try:
                self._server.start()
            except OSError as exc:
                self._server = None
                raise WhisperdError(
                    f"{config.source}: [metrics] {exc}; choose another port or set enabled = false"
                ) from exc
        self._pool = WorkerPool(
            self._plan_slots(),
            self._worker_settings,
            store,
            cancel_grace_seconds=config.workers.cancel_grace_seconds,
            on_event=self._on_worker_event,
            probe=self._probe,
            health=HealthPolicy(
                interval_seconds=config.workers.health_interval_seconds,
                hung_min_seconds=config.workers.hung_job_min_seconds,
                hung_audio_factor=config.workers.hung_job_audio_factor,
            ),
            clock=self._clock,
        )
        self._pool.start()
        self._watcher = Watcher(
            [self._watch_spec(i) for i in config.inboxes],
            settle_seconds=config.daemon.settle_seconds,
            rescan_seconds=config.daemon.rescan_seconds,
            on_settled=self._on_settled,
            on_settled_many=self._on_settled_many,
            on_cancel=self._on_cancel,
            on_rejected=self._on_rejected,
        )
        self._watcher.start()  # watches first, then scans what is already there
        # READY promises that files dropped while whisperd was down are jobs.
        if not self._watcher.wait_start_settled(config.daemon.settle_seconds + START_SCAN_MARGIN_SECONDS):
            log.warning(
                "daemon.start_scan_pending",
                hint="files found at start are still settling; they are queued once they stop changing",
            )
        log.info(
            "daemon.ready",
            inboxes=list(self._inboxes),
            slots=self._pool.size(),
            metrics_port=self._server.bound_port if self._server else None,
        )
        self._notifier.ready(self._status_line())

    def loop_once(self, now: float | None = None) -> None:
        """One supervision pass (the loop calls it every LOOP_SECONDS)."""
        now = self._clock() if now is None else now
        if self._signals.reload.is_set():
            self._signals.reload.clear()
            self.reload()
        assert self._pool is not None and self._store is not None
        # Before supervise() replaces a dead worker, so a pass that finds one
        # sends no keep-alive (and the next pass, 0.2 s later, does).
        self._keep_alive(now)
        self._pool.supervise(now)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_SECONDS
            self._housekeeping()

    def stop(self) -> None:
        """Stop in reverse order; running jobs get shutdown_grace_seconds."""
        self._notifier.stopping("stopping: finishing running jobs")
        log.info("daemon.stopping")
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._pool is not None:
            grace = 0.0 if self._signals.force.is_set() else self._config.daemon.shutdown_grace_seconds
            self._pool.stop(grace, on_wait=self._while_draining, cut_short=self._signals.force.is_set)
            self._pool = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("daemon.stopped")

    def request_stop(self) -> None:
        if self._signals.stop.is_set():
            self._signals.force.set()  # a second SIGTERM: stop at once
        self._signals.stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; inboxes come and go, running jobs stay.
        systemd hears RELOADING=1 first and READY=1 when done, failed or not."""
        self._notifier.reloading()
        try:
            self._reload_config()
        finally:
            self._notifier.ready(self._status_line())

    def _reload_config(self) -> None:
        try:
            fresh = load_config(self._config.source)
            self._make_folders(fresh.inboxes)
        except (ConfigError, OSError) as exc:
            log.error(
                "config.reload_failed", error=str(exc), hint="the previous configuration stays in force"
            )
            return
        pending = _restart_only_changes(self._config, fresh)
        self._config = fresh
        self._inboxes = {i.name: i for i in fresh.inboxes}
        if self._watcher is not None:
            self._watcher.set_specs([self._watch_spec(i) for i in fresh.inboxes])
        log.info("config.reloaded", inboxes=list(self._inboxes))
        if pending:
            log.warning(
                "config.restart_needed",
                settings=pending,
                hint="these changes take effect at the next restart",
            )

    # -- start-up -----------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self._signals.reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    @staticmethod
    def _make_folders(inboxes: tuple[InboxConfig, ...]) -> None:
        for inbox in inboxes:
            for folder in (inbox.path, inbox.output, inbox.cancel, inbox.done, inbox.failed):
                os.makedirs(folder, exist_ok=True)

    def _lock_state_dir(self) -> None:
        """One daemon per state folder: a second one would run every job twice."""
        state_dir = self._config.daemon.state_dir
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, "whisperd.lock")
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the daemon's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise WhisperdError(f"{path}: another whisperd is running with this state folder") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _recover(self, store: JobStore) -> None:
        """Start-up reconciliation: jobs this host was running when it stopped
        go back to the queue (their attempt counts: a file that crashes the
        daemon must not loop), expired leases too; half-written outputs are
        removed; finished jobs whose source was not yet moved are completed."""
        prefix = f"{self._host}/"
        for job in store.list_jobs(states=[JobState.RUNNING], limit=100_000):
            if job.worker and job.worker.startswith(prefix) and job.claim_token:
                state = store.retry_or_fail(
                    job.id,
                    job.claim_token,
                    error="whisperd stopped while the job ran",
                    base_delay=0.0,
                    max_delay=0.0,
                )
                log.warning(
                    "job.recovered",
                    job_id=job.id,
                    inbox=job.spec.inbox,
                    file=job.spec.rel_path,
                    state=state.value,
                    attempts=job.attempts,
                )
        store.reclaim_stale()
        for inbox in self._config.inboxes:
            for leftover in outputs.remove_stale_temps(inbox.output):
                log.info("output.temp_removed", path=leftover)
        self._dispose_finished(store, older_than=0.0)

    def _plan_slots(self) -> list[Slot]:
        gpus = [d.index for d in self._probe.devices()]
        return plan_slots(self._config.workers, gpus)

    def _worker_settings(self, slot: Slot) -> WorkerSettings:
        config = self._config
        workers = config.workers
        slots = len(self._plan_slots())
        budget = workers.cpu_memory_budget_mb if slot.device == "cpu" else 0
        return WorkerSettings(
            worker_id=worker_id_for(slot.name),
            device=slot.device,
            database_url=config.database_url,
            models_folder=config.models.folder,
            allow_download=config.models.allow_download,
            cpu_threads=workers.cpu_threads or default_cpu_threads(slots),
            lease_seconds=workers.lease_seconds,
            heartbeat_seconds=workers.heartbeat_seconds,
            retry_base_seconds=workers.retry_base_seconds,
            retry_max_seconds=workers.retry_max_seconds,
            model_idle_unload_seconds=workers.model_idle_unload_seconds,
            memory_budget_bytes=budget * 1024 * 1024,
            memory_reserve_bytes=workers.memory_reserve_mb * 1024 * 1024,
            cpu_fallback=workers.cpu_fallback,
            health_interval_seconds=workers.health_interval_seconds,
            log_level=config.daemon.log_level,
            log_json=_log_json(config.daemon.log_format),
            parent_pid=os.getpid(),
            # Test hook only (see WorkerSettings.crash_point); never set in production.
            crash_point=os.environ.get("WHISPERD_CRASH_POINT", ""),
        )

    @staticmethod
    def _watch_spec(inbox: InboxConfig) -> WatchSpec:
        return WatchSpec(
            name=inbox.name,
            root=inbox.path,
            cancel_dir=inbox.cancel,
            mode=inbox.watch,
            allow_symlinks=inbox.allow_symlinks,
        )

    # -- the loop's slower duties ---------------------------------------------------

    def _housekeeping(self) -> None:
        assert self._store is not None and self._pool is not None
        for job in self._store.reclaim_stale():
            log.warning(
                "job.lease_expired",
                job_id=job.id,
                inbox=job.spec.inbox,
                file=job.spec.rel_path,
                state=job.state.value,
            )
        self._dispose_finished(self._store, older_than=DISPOSE_AFTER_SECONDS)
        self._enqueue_deferred(self._store)
        if self._watcher is not None:
            for name in self._watcher.dead_inboxes():
                log.error(
                    "watcher.inbox_dead", inbox=name, hint="the folder is gone or its watch died; retrying"
                )
            if self._metrics is not None and self._watcher.last_rescan is not None:
                self._metrics.rescan_completed(time.time() - (time.monotonic() - self._watcher.last_rescan))
            self._count_watcher_events(self._watcher)
        self._notifier.status(self._status_line())

    def _keep_alive(self, now: float) -> None:
        """WATCHDOG=1 every _watchdog_every seconds, only while every worker
        is alive: a pool that cannot keep its workers up lets systemd step in."""
        assert self._pool is not None
        if now < self._next_watchdog or self._pool.alive_count() != self._pool.size():
            return
        self._next_watchdog = now + self._watchdog_every
        self._notifier.watchdog()

    def _count_watcher_events(self, watcher: Watcher) -> None:
        if self._metrics is None:
            return
        seen = watcher.events_seen
        for kind, total in seen.items():
            self._metrics.watcher_event(kind, total - self._watcher_events_counted.get(kind, 0))
        self._watcher_events_counted = seen

    def _dispose_finished(self, store: JobStore, *, older_than: float) -> None:
        for job in store.undisposed(older_than=older_than):
            dispose_source(store, job)

    def _while_draining(self, remaining: float) -> None:
        """Called by the pool every 0.1 s while running jobs finish."""
        now = self._clock()
        if now - self._last_extend >= EXTEND_TIMEOUT_EVERY_SECONDS:
            self._last_extend = now
            self._notifier.extend_timeout(remaining + EXTEND_TIMEOUT_MARGIN_SECONDS)

    def _status_line(self) -> str:
        if self._store is None:
            return "starting"
        counts = self._store.counts()
        return ", ".join(f"{state.value} {counts.get(state, 0)}" for state in JobState)

    # -- callbacks from the watcher's settle thread -----------------------------------

    def _on_settled(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        self._on_settled_many(spec, [(path, identity)])

    def _on_settled_many(self, spec: WatchSpec, files: list[tuple[str, FileIdentity]]) -> None:
        inbox = self._inboxes.get(spec.name)
        store = self._store
        if inbox is None or store is None:
            return
        default_model = self._config.models.default
        for first in range(0, len(files), ENQUEUE_BATCH):
            items = [
                (
                    inbox.job_spec(os.path.relpath(path, inbox.path), default_model),
                    _own_identity(path, identity),
                )
                for path, identity in files[first : first + ENQUEUE_BATCH]
            ]
            queued = store.enqueue_many(items, max_attempts=self._config.workers.max_attempts)
            self._defer_replacements(items, queued)
            created = [job for job, is_new in queued if is_new]
            for job in created:
                self._note_queued(job)
            if created and self._pool is not None:
                self._pool.wake()

    def _defer_replacements(
        self, items: list[tuple[JobSpec, FileIdentity]], queued: list[tuple[Job, bool]]
    ) -> None:
        """A new file at the path of a job still active (the old one was
        replaced): it gets its own job once that job has ended."""
        with self._deferred_lock:
            for (spec, identity), (job, is_new) in zip(items, queued, strict=True):
                if not is_new and (job.identity.device, job.identity.inode) != (
                    identity.device,
                    identity.inode,
                ):
                    self._deferred[(spec.inbox, spec.rel_path)] = (spec, identity)

    def _enqueue_deferred(self, store: JobStore) -> None:
        with self._deferred_lock:
            waiting = list(self._deferred.items())
        for key, (spec, identity) in waiting:
            try:
                current = FileIdentity.of(spec.source)
            except OSError:
                current = None
            if current is None or (current.device, current.inode) != (identity.device, identity.inode):
                with self._deferred_lock:
                    self._deferred.pop(key, None)  # gone, or replaced again (the watcher reports that)
                continue
            job, created = store.enqueue(spec, current, max_attempts=self._config.workers.max_attempts)
            if job.identity.inode == current.inode:
                with self._deferred_lock:
                    self._deferred.pop(key, None)
            if created:
                self._note_queued(job)
                if self._pool is not None:
                    self._pool.wake()

    def _note_queued(self, job: Job) -> None:
        spec = job.spec
        log.info("job.queued", job_id=job.id, inbox=spec.inbox, file=spec.rel_path, model=spec.model)
        if self._metrics is not None:
            self._metrics.job_queued(spec.inbox)

    def _on_cancel(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        store = self._store
        if store is None:
            return
        jobs = _match_cancelled_file(store, spec.name, path, identity)
        if not jobs:
            log.info(
                "cancel.no_active_job",
                inbox=spec.name,
                file=os.path.basename(path),
                hint="nothing queued or running matches this file (already done, failed or unknown)",
            )
            return
        for job in jobs:
            self.cancel_job(job.id, reason=f"moved to the cancel folder: {os.path.basename(path)}")

    def cancel_job(self, job_id: int, *, reason: str) -> Job | None:
        assert self._store is not None
        job = self._store.request_cancel(job_id, reason=reason)
        if job is None:
            return None
        fields = {"job_id": job.id, "inbox": job.spec.inbox, "file": job.spec.rel_path}
        if job.state is JobState.CANCELLED:
            log.info("job.cancelled", **fields, phase="queued")
            if self._metrics is not None:
                self._metrics.job_cancelled(job.spec.inbox, was_running=False)
            dispose_source(self._store, job)
        elif job.state is JobState.RUNNING and self._pool is not None:
            log.info("job.cancelling", **fields)
            if self._metrics is not None:
                self._metrics.job_cancelled(job.spec.inbox, was_running=True)
            self._pool.cancel(job.id)
        return job

    def _on_rejected(self, spec: WatchSpec, path: str, reason: str) -> None:
        inbox = self._inboxes.get(spec.name)
        store = self._store
        if inbox is None or store is None:
            return
        rel_path = os.path.relpath(path, inbox.path)
        try:
            identity = FileIdentity.of(path)
        except OSError:
            return
        job = store.record_rejected(
            inbox.job_spec(rel_path, self._config.models.default), identity, reason=reason
        )
        log.warning("job.rejected", job_id=job.id, inbox=inbox.name, file=rel_path, reason=reason)
        if self._metrics is not None:
            self._metrics.job_rejected(inbox.name, "symlink")
        dispose_source(store, job)

    # -- metrics --------------------------------------------------------------------------

    def _on_worker_event(self, kind: str, fields: dict[str, Any]) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        handlers: dict[str, Callable[[], None]] = {
            "job_started": lambda: metrics.job_started(
                fields["inbox"], fields["device"], fields["queue_wait_seconds"]
            ),
            "job_finished": lambda: metrics.job_finished(
                fields["inbox"],
                fields["outcome"],
                device=fields["device"],
                duration_seconds=fields["duration_seconds"],
                audio_seconds=fields["audio_seconds"],
            ),
            "job_retried": lambda: metrics.job_retried(fields["inbox"]),
            "model_loaded": lambda: metrics.model_loaded(
                fields["model"], fields["device"], fields["seconds"]
            ),
            "model_unloaded": lambda: metrics.model_unloaded(
                fields["model"], fields["device"], fields["reason"]
            ),
            "models_loaded": lambda: metrics.set_models_loaded(fields["device"], fields["models"]),
            "worker_restarted": lambda: metrics.worker_restarted(fields["slot"], fields["reason"]),
            "device_health": lambda: metrics.device_health_changed(fields["device"], fields["healthy"]),
            "cpu_fallback": lambda: metrics.cpu_fallback(fields["model"]),
        }
        handler = handlers.get(kind)
        if handler is not None:
            try:
                handler()
            except Exception as exc:  # noqa: BLE001 - a metrics bug must not stop supervision
                log.warning("metrics.event_failed", kind=kind, error=str(exc))

    def _job_counts(self) -> dict[str, int]:
        if self._store is None:
            return {}
        return {state.value: n for state, n in self._store.counts().items()}

    def _running_jobs(self) -> list[RunningJobView]:
        if self._store is None:
            return []
        return [
            RunningJobView(job_id=j.id, inbox=j.spec.inbox, device=j.device or "", progress=j.progress)
            for j in self._store.list_jobs(states=[JobState.RUNNING], limit=1000)
        ]


def _match_cancelled_file(store: JobStore, inbox: str, path: str, identity: FileIdentity) -> list[Job]:
    """The active job a file in the cancel folder stands for. A move keeps
    inode and mtime; `cp -p` keeps size and mtime; a plain copy keeps only
    name and size."""
    matches = store.find_active_by_identity(identity, inbox=inbox)
    if matches:
        return matches[:1]
    name = os.path.basename(path)
    return [
        job
        for job in store.list_jobs(states=[JobState.QUEUED, JobState.RUNNING], limit=100_000)
        if job.spec.inbox == inbox
        and os.path.basename(job.spec.rel_path) == name
        and job.identity.size == identity.size
    ][:1]


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Dotted names of changed settings that a reload cannot apply."""
    changed = []
    for section in ("daemon", "models", "workers", "metrics"):
        before, after = getattr(old, section), getattr(new, section)
        for setting in dataclasses.fields(before):
            key = f"{section}.{setting.name}"
            same = getattr(before, setting.name) == getattr(after, setting.name)
            if not same and key not in RELOADABLE_SETTINGS:
                changed.append(key)
    return changed


def _own_identity(path: str, identity: FileIdentity) -> FileIdentity:
    """A symbolic link is its own job's file: the link is what moves to
    done/, so the job records the link's identity, not its target's."""
    if os.path.islink(path):
        try:
            return FileIdentity.of(path)
        except OSError:
            return identity
    return identity


def _log_json(log_format: str) -> bool | None:
    return {"json": True, "console": False}.get(log_format)


def run_daemon(config: Config) -> int:
    logs.configure(config.daemon.log_level, json=_log_json(config.daemon.log_format))
    with contextlib.suppress(KeyboardInterrupt):
        return Daemon(config).run()
    return 0
