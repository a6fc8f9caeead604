"""The daemon: the composition root (layer L4).

Builds every part from the Config, starts them in order (store, recovery,
metrics, workers, intake, watcher, READY), runs the supervision loop, and stops them
in reverse. Signal handlers only set events; the loop acts on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO

from whisperd import __version__, atomic_files, logs, outputs, reloading, store_hooks, store_notify
from whisperd.compute_types import check_compute_types
from whisperd.config import Config, InboxConfig
from whisperd.config_load import load_config
from whisperd.disposal import move_owed_source
from whisperd.errors import ConfigError, StoreUnavailable, WhisperdError
from whisperd.events import JobCancelSeen, JobFinished, WorkerEvent
from whisperd.gpu_pool import WorkerPool
from whisperd.hook_runner import HookRunner
from whisperd.intake import Intake, IntakeOwner
from whisperd.jobs import AttemptEnd, AttemptOutcome, Job, JobState
from whisperd.lifecycle import Lifecycle
from whisperd.metrics import Metrics
from whisperd.metrics_server import MetricsServer
from whisperd.metrics_state import RunningJobView, WorkerView
from whisperd.nvml import NvmlProbe
from whisperd.protocols import DeviceProbe
from whisperd.queue_db import JobStore
from whisperd.sdnotify import Notifier
from whisperd.slot_channel import WorkerSettings, worker_id_for
from whisperd.slot_plan import HealthPolicy, Slot, default_cpu_threads, plan_slots
from whisperd.store_instances import InstanceEntry
from whisperd.store_notify import StoreListener, StoreNotice
from whisperd.store_outage import RetryPolicy
from whisperd.watcher import Watcher, WatchSpec
from whisperd.worker import worker_main

log = logs.get_logger("whisperd.daemon")

# How often the loop runs, and how often its slower duties run.
LOOP_SECONDS = 0.2
HOUSEKEEPING_SECONDS = 5.0
# A finished job's source is moved by its worker; the daemon's sweep only
# takes over (crash, kill) once the worker has had this long.
DISPOSE_AFTER_SECONDS = 10.0
# Retention: finished jobs deleted per housekeeping pass (one short write
# transaction, so claims and heartbeats never wait on it for long), and the
# free pages handed back to the file system per pass (SQLite).
PRUNE_BATCH = 500
VACUUM_PAGES = 2000
# READY=1 waits this long for the first worker to import torch and open the
# store (seconds on a warm machine; keep well under the unit's TimeoutStartSec).
WORKER_READY_TIMEOUT_SECONDS = 60.0
# READY waits for the files found at start to become jobs: settle_seconds
# plus this much for looking at and queueing them (intake's share included);
# after it, READY anyway.
START_SCAN_MARGIN_SECONDS = 10.0
# While running jobs drain on stop, ask systemd for more time at most this
# often, each time for what is left of the grace period plus the margin.
EXTEND_TIMEOUT_EVERY_SECONDS = 1.0
EXTEND_TIMEOUT_MARGIN_SECONDS = 5.0
# Settings a reload applies at once (to jobs queued from then on). Every other
# setting outside the [[inbox]] tables takes effect at the next restart.
RELOADABLE_SETTINGS = frozenset(
    {
        "daemon.shutdown_grace_seconds",
        "daemon.keep_finished_days",
        "daemon.keep_finished_jobs",
        "models.default",
        "workers.max_attempts",
    }
)
# In the state folder: its random id in the instance registry (store_instances.py).
INSTANCE_ID_FILE = "instance.id"
# How long stop() waits for intake's thread to finish the item in hand.
INTAKE_STOP_SECONDS = 10.0
# What intake asks of the pool (IntakeOwner), carried to the loop by a queue.
_WAKE, _STOP_JOB = "wake", "stop_job"


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
    # Set with each of the others and by a store notice: the loop runs at once.
    nudge: threading.Event


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
        self._signals = _Signals(
            stop=threading.Event(), force=threading.Event(), reload=threading.Event(), nudge=threading.Event()
        )
        self._inboxes: dict[str, InboxConfig] = {i.name: i for i in config.inboxes}
        self._lock_file: IO[str] | None = None
        self._store: JobStore | None = None
        # Built on first use from the open store (see _life).
        self._lifecycle: Lifecycle | None = None
        self._pool: WorkerPool | None = None
        self._watcher: Watcher | None = None
        self._intake: Intake | None = None
        # Intake's thread puts (wake the workers, stop a running job), the loop takes.
        self._pool_requests: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        # PostgreSQL's wake-ups (store_notify.py): the listener's thread puts, the loop takes.
        self._listener: StoreListener | None = None
        self._notices: queue.SimpleQueue[StoreNotice] = queue.SimpleQueue()
        self._metrics: Metrics | None = None
        self._server: MetricsServer | None = None
        self._hooks: HookRunner | None = None
        self._next_housekeeping = 0.0
        self._next_watchdog = 0.0
        self._watchdog_every = watchdog_ping_seconds(self._notifier.watchdog_interval())
        self._last_extend = float("-inf")
        self._ready = False
        # watcher.events_seen totals already added to the metrics.
        self._watcher_events_counted: dict[str, int] = {}
        # Jobs whose cancel the metrics counted (this daemon's, the CLI's seen in the store);
        # the loop and intake's thread both count.
        self._cancels_counted: set[int] = set()
        self._cancels_lock = threading.Lock()
        self._started_wall = time.time()
        self._instance = config.instance
        # This state folder's token while this daemon holds its registry row.
        self._instance_token: str | None = None
        self._next_instance_beat = 0.0
        # stage -> jobs whose recovery/sweep step raised (see _per_job).
        self._handling_errors: dict[str, int] = {}

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
        self._handle_store_notices(now)
        self._handle_pool_requests(now)

    def start(self) -> None:
        config = self._config
        # A compute type a device cannot run is refused before anything starts.
        check_compute_types(config, [slot.device for slot in self._plan_slots()])
        self._make_folders(config.inboxes)
        self._lock_state_dir()
        self._started_wall = time.time()  # cancel files older than this start are old
        # Every store call (here, in the loop, in intake) waits out an outage.
        retry = RetryPolicy(stop=self._signals.stop, on_wait=self._on_store_wait)
        self._store = store = JobStore.open(
            config.database_url, busy_timeout_seconds=config.daemon.database_busy_timeout_seconds, retry=retry
        )
        # Before recovery: a second daemon of the same name must not re-queue the first one's jobs.
        self._register_instance(store)
        self._register_inboxes(store, at_start=True)
        # Before any worker starts: every job that ends from here on owes its inbox's hooks.
        self._subscribe_hooks(store)
        self._recover(store)
        if store.enable_incremental_vacuum():  # before the workers open the file
            log.info("store.auto_vacuum_enabled", where=store.where)
        self._metrics = Metrics(
            job_counts=self._job_counts,
            claimable_jobs=self._claimable_jobs,
            running_jobs=self._running_jobs,
            devices=self._probe,
            version=__version__,
            workers=self._workers,
            instance=self._instance,
        )
        self._metrics.rescan_interval(config.daemon.rescan_seconds)
        for stage, count in self._handling_errors.items():  # those recovery counted
            self._metrics.job_handling_failed(stage, count)
        store.health.listen(on_change=self._metrics.store_changed, on_error=self._metrics.store_error)
        self._metrics.store_changed(store.health.up)
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
            worker_main=worker_main,
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
        self._listener = store.listener(self._on_store_notice)
        if self._listener is not None:
            self._listener.start()
        # Owed deliveries (a restart) are made now.
        self._hooks = HookRunner(store, self._inboxes, on_outcome=self._metrics.hook_delivery)
        self._hooks.start()
        self._intake = intake = self._make_intake(store)
        intake.start()  # before the watcher, which hands it what it finds
        self._watcher = Watcher(
            [self._watch_spec(i) for i in config.inboxes],
            settle_seconds=config.daemon.settle_seconds,
            rescan_seconds=config.daemon.rescan_seconds,
            on_settled=intake.on_settled,
            on_settled_many=intake.on_settled_many,
            on_cancel=intake.on_cancel,
            on_rejected=intake.on_rejected,
        )
        self._watcher.start()  # watches first, then scans what is already there
        # READY promises that files dropped while whisperd was down are jobs.
        scan_deadline = time.monotonic() + config.daemon.settle_seconds + START_SCAN_MARGIN_SECONDS
        settled = self._watcher.wait_start_settled(scan_deadline - time.monotonic())
        if not (settled and intake.wait_idle(max(0.0, scan_deadline - time.monotonic()))):
            log.warning(
                "daemon.start_scan_pending",
                hint="files found at start are still settling; they are queued once they stop changing",
            )
        if self._pool.size() and not self._pool.wait_for_a_worker(WORKER_READY_TIMEOUT_SECONDS):
            log.warning(
                "daemon.workers_pending",
                seconds=WORKER_READY_TIMEOUT_SECONDS,
                hint="no worker finished starting (importing torch) in time; jobs wait until one has",
            )
        log.info(
            "daemon.ready",
            instance=self._instance,
            inboxes=list(self._inboxes),
            slots=self._pool.size(),
            metrics_port=self._server.bound_port if self._server else None,
        )
        self._ready = True
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
        self._keep_alive(now)
        self._beat_instance(now)
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
            self._pool.stop(grace, on_wait=self._while_draining, cut_short=self._signals.force.is_set)
            self._pool = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._store is not None:
            self._unregister_instance(self._store)
            self._store.close()
            self._store = None
            self._lifecycle = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("daemon.stopped")

    def request_stop(self) -> None:
        if self._signals.stop.is_set():
            self._signals.force.set()  # a second SIGTERM: stop at once
        self._signals.stop.set()
        self._signals.nudge.set()

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
        try:
            fresh = load_config(self._config.source)
            check_compute_types(fresh, [slot.device for slot in self._plan_slots()])
            self._make_folders(fresh.inboxes)
        except (ConfigError, OSError) as exc:
            log.error(
                "config.reload_failed", error=str(exc), hint="the previous configuration stays in force"
            )
            return
        pending = _restart_only_changes(self._config, fresh)
        self._config = fresh
        self._inboxes = {i.name: i for i in fresh.inboxes}
        if self._intake is not None:  # before the watcher hands it files of new inboxes
            self._intake.set_config(fresh)
        if self._watcher is not None:
            self._watcher.set_specs([self._watch_spec(i) for i in fresh.inboxes])
        if self._store is not None:
            self._register_inboxes(self._store, at_start=False)
            self._subscribe_hooks(self._store)
        if self._hooks is not None:
            self._hooks.set_inboxes(self._inboxes)
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
            self._signals.nudge.set()

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

    def _register_instance(self, store: JobStore) -> None:
        """Take this daemon's name in the store's registry, or refuse to start
        while another live daemon holds it (it would re-queue that one's jobs)."""
        config = self._config
        token = _state_folder_token(config.daemon.state_dir)
        slots = self._plan_slots()
        entry = InstanceEntry(
            instance=self._instance,
            token=token,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            slots=len(slots),
            devices=",".join(slot.device for slot in slots),
            started_at=time.time(),
            lease_seconds=config.workers.lease_seconds,
        )
        holder = store.register_instance(entry, stale_after=config.workers.lease_seconds)
        if holder is not None:
            raise WhisperdError(
                f"{store.where}: instance {self._instance!r} is already running (host {holder.host}, "
                f"pid {holder.pid}, last heartbeat {holder.age_seconds:.0f} s ago); give this daemon "
                f"another name with [daemon] instance in {config.source}, or stop the other one"
            )
        self._instance_token = token
        log.info("instance.registered", instance=self._instance, slots=entry.slots, devices=entry.devices)

    def _register_inboxes(self, store: JobStore, *, at_start: bool) -> None:
        """Tell the store which inboxes this instance watches: its workers
        claim only their jobs. An inbox name another live instance uses for
        another folder is refused (at start: the daemon does not start)."""
        inboxes = [(i.name, i.path) for i in self._inboxes.values()]
        conflicts = store.set_instance_inboxes(
            self._instance, inboxes, stale_after=self._config.workers.lease_seconds
        )
        if not conflicts:
            return
        inbox, other, path = conflicts[0]
        message = (
            f"{self._config.source}: inbox {inbox!r} is {self._inboxes[inbox].path} here but {path} on "
            f"instance {other!r}; a shared inbox needs the same name and path on every host, a private "
            "one a name of its own"
        )
        if at_start:
            raise WhisperdError(message)
        log.error("config.inbox_conflict", error=message, hint="its jobs are not claimed by this daemon")

    def _subscribe_hooks(self, store: JobStore) -> None:
        """Tell the store which completion hooks each inbox has: the
        transaction that ends a job (in a worker) records what it owes."""
        store.set_hook_subscriptions(
            self._instance, {name: inbox.hook_kinds() for name, inbox in self._inboxes.items()}
        )

    def _beat_instance(self, now: float) -> None:
        """Keep this instance's registry row fresh; if another daemon took the
        name over (this one was stopped past the lease), stop."""
        if self._instance_token is None or self._store is None or now < self._next_instance_beat:
            return
        self._next_instance_beat = now + min(HOUSEKEEPING_SECONDS, self._config.workers.lease_seconds / 3)
        if not self._store.instance_heartbeat(self._instance, self._instance_token):
            log.error(
                "instance.taken_over",
                instance=self._instance,
                hint="another daemon registered this name while this one was silent; stopping",
            )
            self._instance_token = None
            self.request_stop()

    def _unregister_instance(self, store: JobStore) -> None:
        if self._instance_token is None:
            return
        try:
            store.unregister_instance(self._instance, self._instance_token)
        except StoreUnavailable as exc:  # the row goes stale and is taken over at the next start
            log.warning("instance.unregister_failed", instance=self._instance, error=str(exc))
        self._instance_token = None

    def _recover(self, store: JobStore) -> None:
        """Start-up reconciliation: jobs this instance was running when it
        stopped go back to the queue (their attempt counts: a file that crashes
        the daemon must not loop), expired leases too (any instance's);
        half-written outputs are removed; finished jobs of this instance's
        inboxes whose source was not yet moved are completed."""
        for job in store.running_of_instance(self._instance):
            if job.claim_token:
                self._per_job("recover", job, functools.partial(self._requeue_stopped, job))
        store.reclaim_stale()
        for inbox in self._config.inboxes:
            try:
                for leftover in outputs.remove_stale_temps(inbox.output):
                    log.info("output.temp_removed", path=leftover)
            except Exception as exc:  # noqa: BLE001 - one folder must not keep the daemon from starting
                log.error("output.temp_sweep_failed", inbox=inbox.name, error=str(exc))
        # Sources stuck in their inbox get one more try at each start.
        store.forget_move_failures()
        self._dispose_finished(store, older_than=0.0)

    def _requeue_stopped(self, job: Job) -> None:
        """A job this instance ran when it stopped: a failed attempt, due at once."""
        assert job.claim_token is not None
        end = AttemptEnd(
            outcome=AttemptOutcome.RETRY,
            error="whisperd stopped while the job ran",
            retry_base_seconds=0.0,
            retry_max_seconds=0.0,
        )
        self._life().end_attempt(
            job, job.claim_token, end, log_as="job.recovered", log_fields={"attempts": job.attempts}
        )

    def _life(self) -> Lifecycle:
        """The seam every end of an attempt and every owed move goes through."""
        assert self._store is not None
        if self._lifecycle is None:
            self._lifecycle = Lifecycle(self._store, self._on_event)
        return self._lifecycle

    def _per_job(self, stage: str, job: Job, action: Callable[[], object]) -> None:
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
                **logs.job_fields(job),
                state=job.state.value,
            )
        self._dispose_finished(self._store, older_than=DISPOSE_AFTER_SECONDS)
        if self._intake is not None:
            self._intake.check_deferred()  # files waiting for a job that has ended since
        self._retain(self._store)
        self._store.fold_state_counts()  # keeps status and the job gauges O(states)
        abandoned = self._store.abandon_unsubscribed_hooks()
        if abandoned:
            log.warning("hook.abandoned", deliveries=abandoned, reason=store_hooks.NO_LONGER_CONFIGURED)
        if self._metrics is not None:
            paused = self._store.paused_inboxes()
            self._metrics.set_inboxes_paused({name: name in paused for name in self._inboxes})
        if self._watcher is not None:
            for name in self._watcher.dead_inboxes():
                log.error(
                    "watcher.inbox_dead", inbox=name, hint="the folder is gone or its watch died; retrying"
                )
            if self._metrics is not None and self._watcher.last_rescan is not None:
                self._metrics.rescan_completed(time.time() - (time.monotonic() - self._watcher.last_rescan))
            self._count_watcher_events(self._watcher)
        self._notifier.status(self._status_line())

    def _retain(self, store: JobStore) -> None:
        """Prune one batch of finished jobs past [daemon] keep_finished_*,
        then hand the freed pages back so the file shrinks."""
        settings = self._config.daemon
        if not settings.keep_finished_days and not settings.keep_finished_jobs:
            return
        pruned = store.prune_finished(
            keep_days=settings.keep_finished_days, keep_jobs=settings.keep_finished_jobs, batch=PRUNE_BATCH
        )
        if pruned:
            free = store.vacuum_free_pages(VACUUM_PAGES)
            log.info("store.pruned", jobs=pruned, free_pages_left=free)
            if self._metrics is not None:
                self._metrics.jobs_pruned(pruned)

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
        # Only this instance's inboxes: another host's private sources are not visible here.
        for job in store.undisposed(older_than=older_than, inboxes=list(self._inboxes)):
            if job.state is JobState.CANCELLED and (job.finished_at or 0.0) >= self._started_wall:
                # A queued job cancelled by another process (`whisperd cancel`).
                self._count_cancel(job, was_running=False)
            self._per_job("dispose", job, functools.partial(move_owed_source, self._life(), store, job))
        if self._metrics is not None:
            self._metrics.set_sources_stuck(len(store.stuck_sources()))

    def _count_cancel(self, job: Job, *, was_running: bool) -> None:
        with self._cancels_lock:
            if self._metrics is None or job.id in self._cancels_counted:
                return
            self._cancels_counted.add(job.id)
        self._metrics.job_cancelled(job.spec.inbox, was_running=was_running)

    def _while_draining(self, remaining: float) -> None:
        """Called by the pool every 0.1 s while running jobs finish."""
        now = self._clock()
        if now - self._last_extend >= EXTEND_TIMEOUT_EVERY_SECONDS:
            self._last_extend = now
            self._notifier.extend_timeout(remaining + EXTEND_TIMEOUT_MARGIN_SECONDS)

    def _on_store_wait(self, reason: str, delay: float) -> None:
        """Before each wait for an unreachable store (any thread): tell systemd
        we are waiting, not stuck; at start, ask for more start time."""
        self._notifier.status(f"store unreachable: {reason}; retrying")
        if not self._ready:
            busy = self._config.daemon.database_busy_timeout_seconds
            self._notifier.extend_timeout(delay + busy + EXTEND_TIMEOUT_MARGIN_SECONDS)
        elif self._pool is not None and self._pool.alive_count() == self._pool.size():
            self._notifier.watchdog()

    def _status_line(self) -> str:
        if self._store is None:
            return "starting"
        if not self._store.health.up:
            return f"store unreachable: {self._store.health.reason}"
        counts = self._store.counts()
        return ", ".join(f"{state.value} {counts.get(state, 0)}" for state in JobState)

    # -- store notices (PostgreSQL) ---------------------------------------------------

    def _on_store_notice(self, notice: StoreNotice) -> None:
        """From the listener's thread: hand the notice to the loop, run it now."""
        self._notices.put(notice)
        self._signals.nudge.set()

    def _handle_store_notices(self, now: float) -> None:
        """Wake idle workers for jobs queued in an inbox of ours (by any host),
        stop a job of ours whose cancel was asked for (anywhere), at once
        instead of at the next poll."""
        assert self._pool is not None
        woken: set[str] = set()
        while True:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                break
            if notice.kind == store_notify.QUEUED and notice.inbox in self._inboxes:
                woken.add(notice.inbox)
            elif notice.kind == store_notify.CANCEL and self._pool.runs(notice.job_id):
                # False when the poll or the job's own heartbeat saw it first.
                stopping = self._pool.pick_up_cancel(notice.job_id, now)
                log.debug(
                    "pool.woken", reason="notify", kind=notice.kind, job_id=notice.job_id, stopping=stopping
                )
        if woken:
            self._pool.wake()
            log.debug("pool.woken", reason="notify", kind=store_notify.QUEUED, inboxes=sorted(woken))

    # -- intake (its own thread) and what it asks of the pool ----------------------

    def _make_intake(self, store: JobStore) -> Intake:
        owner = IntakeOwner(
            wake_workers=functools.partial(self._ask_pool, _WAKE, 0),
            stop_running_job=functools.partial(self._ask_pool, _STOP_JOB),
            count_cancel=lambda job, was_running: self._count_cancel(job, was_running=was_running),
            settle=lambda job: self._life().settle_logged(job),
            metrics=self._metrics,
        )
        return Intake(store, self._config, owner, running_since=self._started_wall)

    def _ask_pool(self, kind: str, job_id: int) -> None:
        """From intake's thread: the pool is the loop's; hand it over, run now."""
        self._pool_requests.put((kind, job_id))
        self._signals.nudge.set()

    def _handle_pool_requests(self, now: float) -> None:
        assert self._pool is not None
        wake = False
        while True:
            try:
                kind, job_id = self._pool_requests.get_nowait()
            except queue.Empty:
                break
            if kind == _STOP_JOB:
                self._pool.cancel(job_id, now)
            else:
                wake = True
        if wake:
            self._pool.wake()

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

    def _claimable_jobs(self) -> int:
        if self._store is None:
            return 0
        with self._store.failing_fast():
            return self._store.claimable_count(list(self._inboxes))

    def _job_counts(self) -> dict[str, int]:
        if self._store is None:
            return {}
        with self._store.failing_fast():  # a scrape must not wait out an outage
            return store_job_counts(self._store)

    def _workers(self) -> Sequence[WorkerView]:
        pool = self._pool  # read once: stop() drops it while a scrape may run
        return () if pool is None else pool.workers()

    def _running_jobs(self) -> list[RunningJobView]:
        if self._store is None:
            return []
        with self._store.failing_fast():
            return store_running_jobs(self._store, instance=self._instance)


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


def _state_folder_token(state_dir: str) -> str:
    """The state folder's random id (made at its first use): the same id in
    the registry means the same state folder, whose lock this daemon holds."""
    path = os.path.join(state_dir, INSTANCE_ID_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise WhisperdError(f"{path}: cannot read the instance token: {exc.strerror}") from exc
    if token:
        return token
    token = str(uuid.uuid4())
    atomic_files.write_atomic(path, (token + "\n").encode())  # OutputError names the path and why
    return token


def _log_json(log_format: str) -> bool | None:
    return {"json": True, "console": False}.get(log_format)


def run_daemon(config: Config, *, crash_point: str = "") -> int:
    logs.configure(config.daemon.log_level, json=_log_json(config.daemon.log_format))
    with contextlib.suppress(KeyboardInterrupt):
        return Daemon(config, crash_point=crash_point).run()
    return 0
