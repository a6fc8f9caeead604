"""The daemon: the composition root.

Builds every part from the Config, starts them in order (store, recovery,
metrics, workers, intake, watcher, READY), runs the supervision loop, and stops them
in reverse. Signal handlers only set events; the loop acts on them. Its
helpers beside it: daemon/instance.py (state lock, instance registry,
recovery), daemon/housekeeping.py (the loop's slower duties), daemon/pool_requests.py
(what other threads ask of the pool), daemon/views.py (what the metrics and
systemd are shown), daemon/reloading.py (what a reload cannot apply).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from typing import IO

from whisperd import logs
from whisperd.config import Config, InboxConfig
from whisperd.daemon import reloading
from whisperd.daemon.housekeeping import Housekeeping, Tally
from whisperd.daemon.instance import InstanceRegistry, lock_state_dir, recover
from whisperd.daemon.notify import ServiceNotices
from whisperd.daemon.parts import (
    make_folders,
    make_watcher,
    reread_config,
    start_metrics_server,
    wait_for_a_worker,
    wait_for_start_scan,
    watch_spec,
)
from whisperd.daemon.pool_requests import STOP_JOB, WAKE, PoolRequests
from whisperd.daemon.sdnotify import Notifier
from whisperd.daemon.signals import Signals
from whisperd.daemon.views import StatusViews, make_metrics, status_line
from whisperd.devices.nvml import NvmlProbe
from whisperd.devices.probe import DeviceProbe
from whisperd.engines.compute_types import check_compute_types
from whisperd.errors import StoreUnavailable, WhisperdError
from whisperd.events import JobCancelSeen, JobFinished, WorkerEvent
from whisperd.hooks.runner import HookRunner
from whisperd.intake.intake import Intake, IntakeOwner
from whisperd.jobs import Job
from whisperd.lifecycle import Lifecycle
from whisperd.metrics.registry import Metrics
from whisperd.metrics.server import MetricsServer
from whisperd.store.job_store import JobStore
from whisperd.store.notify import StoreListener
from whisperd.store.outage import RetryPolicy
from whisperd.watch.watcher import Watcher
from whisperd.workers.channel import WorkerSettings, worker_id_for
from whisperd.workers.pool import WorkerPool
from whisperd.workers.slots import HealthPolicy, Slot, default_cpu_threads, plan_slots
from whisperd.workers.worker import worker_main

log = logs.get_logger("whisperd.daemon.root")

# How often the loop runs, and how often its slower duties run (daemon/housekeeping.py).
LOOP_SECONDS = 0.2
HOUSEKEEPING_SECONDS = 5.0
# How long stop() waits for intake's thread to finish the item in hand.
INTAKE_STOP_SECONDS = 10.0


def watchdog_ping_seconds(watchdog_timeout: float | None) -> float:
    """How often to send WATCHDOG=1: half of systemd's WatchdogSec, so one
    late ping is not fatal (never less often than housekeeping runs)."""
    if watchdog_timeout is None:
        return HOUSEKEEPING_SECONDS
    return min(HOUSEKEEPING_SECONDS, watchdog_timeout / 2)


class Daemon:
    """whisperd run."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        probe: DeviceProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        crash_point: str = "",
    ) -> None:
        self._config = config
        self._crash_point = crash_point  # test hook only: `whisperd run --crash-point`
        self._notifier = notifier or Notifier()
        self._probe: DeviceProbe = probe or NvmlProbe()
        self._clock = clock
        self._signals = Signals()
        self._inboxes: dict[str, InboxConfig] = {i.name: i for i in config.inboxes}
        self._lock_file: IO[str] | None = None
        self._store: JobStore | None = None
        # Built on first use from the open store (see _life).
        self._lifecycle: Lifecycle | None = None
        self._pool: WorkerPool | None = None
        self._watcher: Watcher | None = None
        self._intake: Intake | None = None
        # What intake's thread and the store listener's (PostgreSQL) ask of the pool, the loop's.
        self._requests = PoolRequests(self._signals.nudge)
        self._listener: StoreListener | None = None
        self._metrics: Metrics | None = None
        self._server: MetricsServer | None = None
        self._hooks: HookRunner | None = None
        self._next_housekeeping = 0.0
        self._tally = Tally()  # handling errors and cancels (the loop and intake's thread count)
        self._housekeeper = Housekeeping(self._tally)
        # What systemd hears while the daemon runs (keep-alive, more time, store waits).
        self._notices = ServiceNotices(
            self._notifier,
            clock,
            watchdog_every=watchdog_ping_seconds(self._notifier.watchdog_interval()),
            busy_timeout=lambda: self._config.daemon.database_busy_timeout_seconds,
            pool=lambda: self._pool,
        )
        self._started_wall = time.time()
        self._instance = config.instance
        self._registry = InstanceRegistry(
            config.instance, config_source=config.source, on_taken_over=self.request_stop
        )
        self._views = self._make_views()

    def _make_views(self) -> StatusViews:
        """What a scrape reads: the store and the pool as they are at that moment."""
        return StatusViews(
            instance=self._config.instance,
            store=lambda: self._store,
            pool=lambda: self._pool,
            inboxes=lambda: list(self._inboxes),
        )

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Start, supervise until asked to stop, stop. Returns the exit code."""
        self._signals.install()
        try:
            self.start()
        except WhisperdError as exc:
            log.error("daemon.start_failed", error=str(exc))
            self.stop()
            return 1
        except BaseException:
            # Anything else (an inotify limit, a bug): what did start is stopped
            # before the traceback, or its threads would keep the process alive.
            self.stop()
            raise
        try:
            self._supervise_until_stopped()
        finally:
            self.stop()
        return 0

    def _supervise_until_stopped(self) -> None:
        """A whole pass every LOOP_SECONDS; in between, a nudge (a store
        notice, a request from intake) is answered at once without one: a
        busy shared store sends many notices, and a pass reads every busy
        slot's job."""
        next_pass = self._clock()
        while not self._signals.stop.is_set():
            self._signals.nudge.wait(max(0.0, next_pass - self._clock()))
            self._signals.nudge.clear()
            if self._signals.stop.is_set():
                break
            now = self._clock()
            try:
                if now >= next_pass or self._signals.reload.is_set():
                    next_pass = now + LOOP_SECONDS
                    self.loop_once(now)
                else:
                    self._handle_wakeups(now)
            except StoreUnavailable:
                if not self._signals.stop.is_set():  # raised only once asked to stop
                    raise

    def _handle_wakeups(self, now: float) -> None:
        """What a nudge between passes brings: store notices, intake's requests."""
        assert self._pool is not None
        self._requests.handle(self._pool, now, inboxes=self._inboxes)

    def start(self) -> None:
        """Start every part in order (see the module docstring), then READY=1."""
        config = self._config
        # A compute type a device cannot run is refused before anything starts.
        check_compute_types(config, [slot.device for slot in self._plan_slots()])
        make_folders(config.inboxes)
        self._lock_file = lock_state_dir(config.daemon.state_dir)
        self._started_wall = time.time()  # cancel files older than this start are old
        # Every store call (here, in the loop, in intake) waits out an outage.
        retry = RetryPolicy(stop=self._signals.stop, on_wait=self._notices.on_store_wait)
        self._store = store = JobStore.open(
            config.database_url, busy_timeout_seconds=config.daemon.database_busy_timeout_seconds, retry=retry
        )
        self._prepare_store(store)
        metrics = self._start_metrics(store)
        self._pool = WorkerPool(
            self._plan_slots(),
            self._worker_settings,
            store,
            worker_main=worker_main,
            lifecycle=self._life(),
            cancel_grace_seconds=config.workers.cancel_grace_seconds,
            on_event=self._on_event,
            probe=self._probe,
            health=HealthPolicy(
                interval_seconds=config.workers.health_interval_seconds,
                hung_min_seconds=config.workers.hung_job_min_seconds,
                hung_audio_factor=config.workers.hung_job_audio_factor,
            ),
            clock=self._clock,
        )
        self._pool.start()
        self._start_feeders(store, metrics)
        assert self._watcher is not None and self._intake is not None
        wait_for_start_scan(self._watcher, self._intake, settle_seconds=config.daemon.settle_seconds)
        wait_for_a_worker(self._pool)
        self._announce_ready()

    def _prepare_store(self, store: JobStore) -> None:
        """Take the instance's name, register its inboxes and hooks, recover."""
        config = self._config
        lease = config.workers.lease_seconds
        devices = [slot.device for slot in self._plan_slots()]
        # Before recovery: a second daemon of the same name must not re-queue the first one's jobs.
        self._registry.register(store, state_dir=config.daemon.state_dir, devices=devices, stale_after=lease)
        self._registry.register_inboxes(store, self._inboxes, stale_after=lease, at_start=True)
        # Before any worker starts: every job that ends from here on owes its inbox's hooks.
        self._registry.subscribe_hooks(store, self._inboxes)
        recover(
            store,
            self._life(),
            instance=self._instance,
            inboxes=config.inboxes,
            per_job=self._tally.per_job,
            dispose_owed=functools.partial(
                self._housekeeper.dispose_finished,
                store,
                self._life(),
                inboxes=self._inboxes,
                started_wall=self._started_wall,
                older_than=0.0,
                metrics=self._metrics,
            ),
        )
        if store.enable_incremental_vacuum():  # before the workers open the file
            log.info("store.auto_vacuum_enabled", where=store.where)

    def _start_metrics(self, store: JobStore) -> Metrics:
        config = self._config
        self._metrics = metrics = make_metrics(self._views, probe=self._probe, instance=self._instance)
        metrics.rescan_interval(config.daemon.rescan_seconds)
        self._tally.attach(metrics)  # with what recovery counted
        store.health.listen(on_change=metrics.store_changed, on_error=metrics.store_error)
        metrics.store_changed(store.health.up)
        self._server = start_metrics_server(config, metrics)
        return metrics

    def _start_feeders(self, store: JobStore, metrics: Metrics) -> None:
        """After the pool: the store listener, the hook runner, intake, the watcher."""
        self._listener = store.listener(self._requests.on_store_notice)
        if self._listener is not None:
            self._listener.start()
        # Owed deliveries (a restart) are made now.
        self._hooks = HookRunner(store, self._inboxes, on_outcome=metrics.hook_delivery)
        self._hooks.start()
        self._intake = intake = self._make_intake(store)
        intake.start()  # before the watcher, which hands it what it finds
        self._watcher = make_watcher(self._config, intake)
        self._watcher.start()  # watches first, then scans what is already there

    def _announce_ready(self) -> None:
        """daemon.ready and READY=1, once the start scan and a worker are done (or waited for)."""
        assert self._pool is not None
        log.info(
            "daemon.ready",
            instance=self._instance,
            inboxes=list(self._inboxes),
            slots=self._pool.size(),
            metrics_port=self._server.bound_port if self._server else None,
        )
        self._notices.ready = True
        self._notifier.ready(self._status_line())

    def loop_once(self, now: float | None = None) -> None:
        """One supervision pass (the loop calls it every LOOP_SECONDS)."""
        now = self._clock() if now is None else now
        if self._signals.reload.is_set():
            self._signals.reload.clear()
            self.reload()
        assert self._pool is not None and self._store is not None
        self._handle_wakeups(now)
        # Before supervise() replaces a dead worker, so a pass that finds one
        # sends no keep-alive (and the next pass, 0.2 s later, does).
        self._notices.keep_alive(now, self._pool)
        self._registry.beat(
            self._store, now, every=min(HOUSEKEEPING_SECONDS, self._config.workers.lease_seconds / 3)
        )
        self._pool.supervise(now)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_SECONDS
            self._housekeeping()

    def stop(self) -> None:
        """Stop in reverse order; running jobs get shutdown_grace_seconds."""
        self._notifier.stopping("stopping: finishing running jobs")
        log.info("daemon.stopping")
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._intake is not None:
            self._intake.stop(INTAKE_STOP_SECONDS)  # after the watcher that feeds it
            self._intake = None
        if self._hooks is not None:
            self._hooks.stop()  # a hook program still running is killed; its delivery stays owed
            self._hooks = None
        if self._pool is not None:
            grace = 0.0 if self._signals.force.is_set() else self._config.daemon.shutdown_grace_seconds
            self._pool.stop(grace, on_wait=self._notices.while_draining, cut_short=self._signals.force.is_set)
            self._pool = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._store is not None:
            self._registry.unregister(self._store)
            self._store.close()
            self._store = None
            self._lifecycle = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("daemon.stopped")

    def request_stop(self) -> None:
        self._signals.request_stop()

    def reload(self) -> None:
        """SIGHUP: re-read the config; inboxes come and go, running jobs stay.
        systemd hears RELOADING=1 first and READY=1 when done, failed or not."""
        self._notifier.reloading()
        try:
            self._reload_config()
        finally:
            with contextlib.suppress(OSError):  # `whisperd reload` (ExecReload) waits for this
                reloading.note_reloaded(self._config.daemon.state_dir)
            self._notifier.ready(self._status_line())

    def _reload_config(self) -> None:
        fresh = reread_config(self._config, lambda: [slot.device for slot in self._plan_slots()])
        if fresh is None:
            return
        pending = reloading.restart_only_changes(self._config, fresh)
        self._config = fresh
        self._inboxes = {i.name: i for i in fresh.inboxes}
        if self._intake is not None:  # before the watcher hands it files of new inboxes
            self._intake.set_config(fresh)
        if self._watcher is not None:
            self._watcher.set_specs([watch_spec(i) for i in fresh.inboxes])
        if self._store is not None:
            lease = self._config.workers.lease_seconds
            self._registry.register_inboxes(self._store, self._inboxes, stale_after=lease, at_start=False)
            self._registry.subscribe_hooks(self._store, self._inboxes)
        if self._hooks is not None:
            self._hooks.set_inboxes(self._inboxes)
        log.info("config.reloaded", inboxes=list(self._inboxes))
        reloading.report_restart_needed(pending)

    def _life(self) -> Lifecycle:
        """The seam every end of an attempt and every owed move goes through."""
        assert self._store is not None
        if self._lifecycle is None:
            self._lifecycle = Lifecycle(self._store, self._on_event)
        return self._lifecycle

    def _plan_slots(self) -> list[Slot]:
        gpus = [d.index for d in self._probe.devices()]
        return plan_slots(self._config.workers, gpus)

    def _worker_settings(self, slot: Slot) -> WorkerSettings:
        return self.worker_settings(
            self._config, slot, slots=len(self._plan_slots()), crash_point=self._crash_point
        )

    @staticmethod
    def worker_settings(config: Config, slot: Slot, *, slots: int, crash_point: str = "") -> WorkerSettings:
        """What the worker on `slot` runs with, one of `slots` in the pool (pure: tests call it).
        crash_point: the crash tests' hook (WorkerSettings.crash_point), "" otherwise."""
        workers = config.workers
        budget = workers.cpu_memory_budget_mb if slot.device == "cpu" else 0
        return WorkerSettings(
            worker_id=worker_id_for(config.instance, slot.name),
            instance=config.instance,
            device=slot.device,
            database_url=config.database_url,
            database_busy_timeout_seconds=config.daemon.database_busy_timeout_seconds,
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
            crash_point=crash_point,
            decode_timeout_seconds=workers.decode_timeout_seconds,
        )

    # -- the loop's slower duties (daemon/housekeeping.py) ---------------------------------

    def _housekeeping(self) -> None:
        assert self._store is not None
        self._housekeeper.run(
            self._store,
            self._life(),
            config=self._config,
            inboxes=self._inboxes,
            started_wall=self._started_wall,
            metrics=self._metrics,
            intake=self._intake,
            watcher=self._watcher,
        )
        self._notifier.status(self._status_line())

    def _count_cancel(self, job: Job, *, was_running: bool) -> None:
        self._tally.count_cancel(job, was_running=was_running)

    def _status_line(self) -> str:
        return status_line(self._store)

    # -- intake (its own thread) and what it asks of the pool ----------------------

    def _make_intake(self, store: JobStore) -> Intake:
        owner = IntakeOwner(
            wake_workers=functools.partial(self._requests.ask, WAKE, 0),
            stop_running_job=functools.partial(self._requests.ask, STOP_JOB),
            count_cancel=lambda job, was_running: self._count_cancel(job, was_running=was_running),
            dispose=lambda job: self._life().dispose_logged(job),
            metrics=self._metrics,
        )
        return Intake(store, self._config, owner, running_since=self._started_wall)

    # -- metrics --------------------------------------------------------------------------

    def _on_event(self, event: WorkerEvent) -> None:
        """A worker's or the pool's event: to the metrics, then what the daemon itself does."""
        metrics = self._metrics
        if metrics is None:
            return
        try:
            metrics.sink.handle(event)
            self._count_cancel_event(event)
        except Exception as exc:  # noqa: BLE001 - a metrics bug must not stop supervision
            log.warning("metrics.event_failed", kind=event.kind, error=str(exc))

    def _count_cancel_event(self, event: WorkerEvent) -> None:
        """A cancel seen while its job ran is counted once (see _count_cancel)."""
        if isinstance(event, JobCancelSeen):
            self._cancel_seen(event.job_id)
        elif isinstance(event, JobFinished) and event.outcome == "cancelled":
            # The worker may see a cancel requested by another process before
            # the pool's poll does: the cancel still happened while running.
            self._cancel_seen(event.job_id)

    def _cancel_seen(self, job_id: int) -> None:
        """The pool found a cancel another process requested for a running job."""
        job = self._store.get(job_id) if self._store is not None else None
        if job is not None:
            self._count_cancel(job, was_running=True)


def _log_json(log_format: str) -> bool | None:
    return {"json": True, "console": False}.get(log_format)


def run_daemon(config: Config, *, crash_point: str = "") -> int:
    logs.configure(config.daemon.log_level, json=_log_json(config.daemon.log_format))
    with contextlib.suppress(KeyboardInterrupt):
        return Daemon(config, crash_point=crash_point).run()
    return 0
