"""Prometheus metrics for whisperd.

`Metrics` owns a private CollectorRegistry. The daemon and the pool record
what happens through its hook methods (job_queued, job_finished, ...), never
by touching metric objects inside their loops; the typed events of workers
and the pool (events.py) reach those hooks through `MetricsSink`. What is a state rather than an
event -- queue depth, running jobs' progress and ETA, GPU memory and health,
each worker process's memory -- is read at scrape time from callables given
to the constructor, so a scrape always shows the job store and the hardware
as they are.

Label values are bounded: inbox, device, model and slot names come from the
config and the hardware; outcome, phase, reason and kind come from the fixed
tuples below, and anything else is counted as "other" (and logged), so a
caller's typo can neither explode the series count nor crash a hook. File
names and job ids never become label values.

The gauges read at scrape time are metrics/state.py's; `metrics.server.MetricsServer`
serves the registry over HTTP on a thread it owns.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from whisperd import events
from whisperd.devices.probe import DeviceProbe
from whisperd.metrics.state import RunningJobView, StateCollector, WorkerView

_log = structlog.stdlib.get_logger(__name__)

# Bounded label values. A value outside its tuple is recorded as "other".
# How an attempt ended. "rejected": the file broke an inbox rule (too large,
# too long, not media) -- the file's fault, so it stays out of failure rates;
# "retry": the attempt failed and the job went back to the queue; "lease_lost":
# another worker owns the job now. Only done/failed/cancelled/rejected end a job.
OUTCOMES = ("done", "failed", "cancelled", "rejected", "retry", "lease_lost")
REJECT_REASONS = (
    "symlink",
    "too_large",
    "too_long",
    "not_media",
    "empty",
    "unreadable",
    "duplicate",
    "unsupported_extension",
)
RESTART_REASONS = ("crashed", "cancel_kill", "hung", "unhealthy", "silent")
UNLOAD_REASONS = ("idle", "pressure", "oom", "shutdown")
# Completion hooks: the kinds, and what one try did (retried: failed, tried again later).
HOOK_KINDS = ("on_done", "on_failed", "webhook")
HOOK_OUTCOMES = ("delivered", "retried", "failed")
# watchdog's event types (closed_no_write: a file opened for reading was
# closed), plus "overflow" for a kernel queue overflow.
WATCHER_EVENT_KINDS = (
    "created",
    "modified",
    "moved",
    "deleted",
    "closed",
    "closed_no_write",
    "opened",
    "overflow",
)
OTHER = "other"

# Histogram buckets, in the metric's unit. Jobs run from seconds (a voice
# note) to hours (a day-long recording) and may wait in the queue as long.
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# Processing time per second of audio: below 1 is faster than real time.
REALTIME_FACTOR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10)
MODEL_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The daemon's metrics: hooks for events, collectors for state.

    job_counts: job count per state name (JobState values), from the store.
    claimable_jobs: queued jobs this instance may claim (its inboxes, not paused).
    running_jobs: the running jobs, for progress gauges.
    devices: the GPU probe, or None on a CPU-only setup.
    workers: the worker processes, for their memory gauges.
    version: whisperd's version for whisperd_build_info.
    instance: this daemon's instance name for whisperd_instance_info ("": none).
    The callables run on the scrape thread and must be thread-safe; one that
    raises costs its own series for that scrape, not the whole scrape.
    """

    def __init__(
        self,
        *,
        job_counts: Callable[[], Mapping[str, int]],
        running_jobs: Callable[[], Sequence[RunningJobView]],
        devices: DeviceProbe | None,
        version: str,
        claimable_jobs: Callable[[], int] | None = None,
        workers: Callable[[], Sequence[WorkerView]] = lambda: (),
        instance: str = "",
        process_collector: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        # (model, device) pairs ever reported, so unloaded models show 0.
        self._known_models: set[tuple[str, str]] = set()
        # Label values already warned about, so a bad caller logs once.
        self._warned: set[tuple[str, str]] = set()
        self._define_event_metrics()
        self._define_store_metrics()
        # Where the pool's events go (the daemon hands each one over).
        self.sink = MetricsSink(self)
        self._build_info(version)
        if instance:
            self._instance_info(instance)
        # The state collector goes first: a source failing during a scrape is
        # then already counted in whisperd_scrape_errors_total of that scrape.
        self.registry.register(
            StateCollector(
                job_counts=job_counts,
                claimable_jobs=claimable_jobs,
                running_jobs=running_jobs,
                devices=devices,
                workers=workers,
                on_error=self._collector_failed,
            )
        )
        self._scrape_errors = Counter(
            "whisperd_scrape_errors_total",
            "Scrapes where reading a state source failed (its series were left out).",
            ["collector"],
            registry=self.registry,
        )
        if process_collector:
            # process_resident_memory_bytes, open fds, start time: a
            # long-running daemon's leaks show here first.
            ProcessCollector(registry=self.registry)

    # -- hooks ------------------------------------------------------------

    def job_queued(self, inbox: str) -> None:
        self._queued.labels(inbox).inc()

    def job_started(self, inbox: str, device: str, queue_wait_seconds: float) -> None:
        self._queue_wait.labels(inbox).observe(max(queue_wait_seconds, 0.0))

    def job_finished(
        self,
        inbox: str,
        outcome: str,
        *,
        device: str,
        duration_seconds: float,
        audio_seconds: float | None,
    ) -> None:
        """A job that ran has ended. The duration is observed for every
        outcome (the device was busy that long); the realtime factor and the
        audio total only for "done", the one outcome that decoded all of it."""
        outcome = self._bounded("outcome", outcome, OUTCOMES)
        duration = max(duration_seconds, 0.0)
        self._finished.labels(inbox, outcome).inc()
        self._duration.labels(inbox, device).observe(duration)
        if outcome == "done" and audio_seconds is not None and audio_seconds > 0:
            self._audio.labels(inbox).inc(audio_seconds)
            self._realtime_factor.labels(inbox, device).observe(duration / audio_seconds)

    def job_retried(self, inbox: str) -> None:
        self._retries.labels(inbox).inc()

    def job_cancelled(self, inbox: str, *, was_running: bool) -> None:
        """A cancel took effect. A running job also ends through
        job_finished(outcome="cancelled"); a queued one only counts here."""
        self._cancels.labels(inbox, "running" if was_running else "queued").inc()

    def job_rejected(self, inbox: str, reason: str) -> None:
        self._rejected.labels(inbox, self._bounded("reject reason", reason, REJECT_REASONS)).inc()

    def worker_restarted(self, slot: str, reason: str) -> None:
        self._restarts.labels(slot, self._bounded("restart reason", reason, RESTART_REASONS)).inc()

    def job_handling_failed(self, stage: str, count: int = 1) -> None:
        self._handling_failed.labels(stage).inc(count)

    def model_loaded(self, model: str, device: str, seconds: float) -> None:
        self._model_loads.labels(model, device).inc()
        self._model_load_seconds.labels(model, device).observe(max(seconds, 0.0))
        self._set_model(model, device, loaded=True)

    def model_unloaded(self, model: str, device: str, reason: str) -> None:
        reason = self._bounded("unload reason", reason, UNLOAD_REASONS)
        self._model_unloads.labels(model, device, reason).inc()
        self._set_model(model, device, loaded=False)

    def set_models_loaded(self, device: str, models: Sequence[str]) -> None:
        """The full list of models now loaded on `device`; others read 0."""
        wanted = set(models)
        with self._lock:
            self._known_models.update((model, device) for model in wanted)
            for known_model, known_device in self._known_models:
                if known_device == device:
                    self._models_loaded.labels(known_model, device).set(1 if known_model in wanted else 0)

    def cpu_fallback(self, model: str) -> None:
        self._cpu_fallbacks.labels(model).inc()

    def device_health_changed(self, device: str, healthy: bool) -> None:
        self._device_healthy.labels(device).set(1 if healthy else 0)

    def watcher_event(self, kind: str, count: int = 1) -> None:
        """`count` events of one kind (the daemon reports them in batches)."""
        if count > 0:
            kind = self._bounded("watcher event kind", kind, WATCHER_EVENT_KINDS)
            self._watcher_events.labels(kind).inc(count)

    def store_changed(self, up: bool) -> None:
        self._store_up.set(1 if up else 0)

    def store_error(self) -> None:
        self._store_errors.inc()

    def _define_store_metrics(self) -> None:
        self._store_up = Gauge(
            "whisperd_store_up", "1 while the job store answers, 0 during an outage.", registry=self.registry
        )
        self._store_up.set(1)
        self._store_errors = Counter(
            "whisperd_store_errors_total",
            "Job store calls that failed because the store was unreachable (each retry counts).",
            registry=self.registry,
        )

    def rescan_completed(self, timestamp: float) -> None:
        self._last_rescan.set(timestamp)

    def rescan_interval(self, seconds: float) -> None:
        """The configured rescan period (0: periodic rescans are off)."""
        self._rescan_interval.set(max(seconds, 0.0))

    def set_sources_stuck(self, count: int) -> None:
        self._sources_stuck.set(count)

    def set_inboxes_paused(self, paused: Mapping[str, bool]) -> None:
        """1 for each configured inbox paused with `whisperd pause`, else 0."""
        for inbox, on in paused.items():
            self._inbox_paused.labels(inbox).set(1 if on else 0)

    def jobs_pruned(self, count: int) -> None:
        self._jobs_pruned.inc(count)

    def hook_delivery(self, inbox: str, kind: str, outcome: str) -> None:
        """One try at a completion hook: delivered, retried (it failed, tried again later), failed."""
        kind = self._bounded("hook kind", kind, HOOK_KINDS)
        self._hook_deliveries.labels(inbox, kind, self._bounded("hook outcome", outcome, HOOK_OUTCOMES)).inc()

    # -- internals --------------------------------------------------------

    def _define_event_metrics(self) -> None:
        # In this order: the exposition lists the series as they were registered.
        self._define_job_metrics()
        self._define_handling_metrics()
        self._define_model_metrics()
        self._define_folder_metrics()

    def _define_job_metrics(self) -> None:
        r = self.registry
        self._queued = Counter("whisperd_jobs_queued_total", "Jobs queued.", ["inbox"], registry=r)
        self._finished = Counter(
            "whisperd_jobs_finished_total",
            "Job attempts that ended, by outcome (done, failed, cancelled, rejected, retry, lease_lost).",
            ["inbox", "outcome"],
            registry=r,
        )
        self._queue_wait = Histogram(
            "whisperd_job_queue_wait_seconds",
            "Time from queueing to a worker starting the job.",
            ["inbox"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "whisperd_job_duration_seconds",
            "Time a worker spent on a job, any outcome.",
            ["inbox", "device"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._realtime_factor = Histogram(
            "whisperd_job_realtime_factor",
            "Processing seconds per second of audio for completed jobs (below 1: faster than real time).",
            ["inbox", "device"],
            buckets=REALTIME_FACTOR_BUCKETS,
            registry=r,
        )
        self._audio = Counter(
            "whisperd_audio_seconds_total", "Seconds of audio transcribed.", ["inbox"], registry=r
        )
        self._retries = Counter(
            "whisperd_job_retries_total", "Failed attempts put back in the queue.", ["inbox"], registry=r
        )

    def _define_handling_metrics(self) -> None:
        r = self.registry
        self._hook_deliveries = Counter(
            "whisperd_hook_deliveries_total",
            "Tries at completion hooks (on_done, on_failed, webhook), by outcome "
            "(delivered, retried, failed).",
            ["inbox", "kind", "outcome"],
            registry=r,
        )
        self._cancels = Counter(
            "whisperd_job_cancels_total",
            "Jobs cancelled, by the phase they were in.",
            ["inbox", "phase"],
            registry=r,
        )
        self._rejected = Counter(
            "whisperd_jobs_rejected_total",
            "Files refused without queueing a job.",
            ["inbox", "reason"],
            registry=r,
        )
        self._restarts = Counter(
            "whisperd_worker_restarts_total",
            "Worker processes replaced, by reason.",
            ["slot", "reason"],
            registry=r,
        )
        self._handling_failed = Counter(
            "whisperd_job_handling_errors_total",
            "Jobs or files whose handling raised: start-up recovery, a sweep, intake (stage names which;"
            " logged with the job or file, retried later).",
            ["stage"],
            registry=r,
        )

    def _define_folder_metrics(self) -> None:
        r = self.registry
        self._device_healthy = Gauge(
            "whisperd_device_healthy",
            "1 while the pool considers the device usable, 0 after it marked it unhealthy.",
            ["device"],
            registry=r,
        )
        self._watcher_events = Counter(
            "whisperd_watcher_events_total", "File-system events seen by the watcher.", ["kind"], registry=r
        )
        self._last_rescan = Gauge(
            "whisperd_last_rescan_timestamp_seconds",
            "Unix time the last full rescan of the inboxes finished (0: none yet).",
            registry=r,
        )
        self._rescan_interval = Gauge(
            "whisperd_rescan_interval_seconds",
            "Configured period of the full inbox rescan (daemon.rescan_seconds; 0: off).",
            registry=r,
        )
        self._sources_stuck = Gauge(
            "whisperd_sources_stuck",
            "Finished jobs whose source could not be moved out of its inbox (whisperd gave up).",
            registry=r,
        )
        self._inbox_paused = Gauge(
            "whisperd_inbox_paused",
            "1 while the inbox is paused (whisperd pause): its queued jobs wait.",
            ["inbox"],
            registry=r,
        )
        self._jobs_pruned = Counter(
            "whisperd_jobs_pruned_total",
            "Finished jobs deleted from the store by retention ([daemon] keep_finished_*).",
            registry=r,
        )

    def _define_model_metrics(self) -> None:
        r = self.registry
        self._model_loads = Counter(
            "whisperd_model_loads_total", "Models loaded.", ["model", "device"], registry=r
        )
        self._model_load_seconds = Histogram(
            "whisperd_model_load_seconds",
            "Time to load a model onto a device.",
            ["model", "device"],
            buckets=MODEL_LOAD_BUCKETS,
            registry=r,
        )
        self._models_loaded = Gauge(
            "whisperd_models_loaded",
            "1 while a model is loaded on a device.",
            ["model", "device"],
            registry=r,
        )
        self._model_unloads = Counter(
            "whisperd_model_unloads_total",
            "Models unloaded, by reason.",
            ["model", "device", "reason"],
            registry=r,
        )
        self._cpu_fallbacks = Counter(
            "whisperd_cpu_fallbacks_total",
            "Jobs run on the CPU because no GPU could take them.",
            ["model"],
            registry=r,
        )

    def _build_info(self, version: str) -> None:
        info = Gauge(
            "whisperd_build_info",
            "Always 1; labels name the running whisperd and Python versions.",
            ["version", "python"],
            registry=self.registry,
        )
        info.labels(version, ".".join(str(part) for part in sys.version_info[:3])).set(1)

    def _instance_info(self, instance: str) -> None:
        # Not "instance": Prometheus sets that label to the scrape target.
        info = Gauge(
            "whisperd_instance_info",
            "Always 1; names this daemon among those sharing the job store ([daemon] instance).",
            ["whisperd_instance"],
            registry=self.registry,
        )
        info.labels(instance).set(1)

    def _set_model(self, model: str, device: str, *, loaded: bool) -> None:
        with self._lock:
            self._known_models.add((model, device))
            self._models_loaded.labels(model, device).set(1 if loaded else 0)

    def _bounded(self, what: str, value: str, allowed: Sequence[str]) -> str:
        if value in allowed:
            return value
        with self._lock:
            first_time = (what, value) not in self._warned
            self._warned.add((what, value))
        if first_time:
            _log.warning("metrics.unknown_label", label=what, value=value, counted_as=OTHER)
        return OTHER

    def _collector_failed(self, collector: str, exc: Exception) -> None:
        self._scrape_errors.labels(collector).inc()
        _log.warning("metrics.collector_failed", collector=collector, error=str(exc))


class MetricsSink:
    """Where the daemon hands every worker or pool event: each
    becomes the hook call the daemon made for it when events were strings
    (same metrics, labels, values). Events that are no metric's business
    (a worker's start, its proofs of life, a cancel the pool saw) are left
    to the daemon and the pool."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def handle(self, event: events.WorkerEvent) -> None:
        m = self._metrics
        match event:
            case events.JobStarted():
                m.job_started(event.inbox, event.device, event.queue_wait_seconds)
            case events.JobFinished():
                m.job_finished(
                    event.inbox,
                    event.outcome,
                    device=event.device,
                    duration_seconds=event.duration_seconds,
                    audio_seconds=event.audio_seconds,
                )
            case events.JobRetried():
                m.job_retried(event.inbox)
            case events.JobRejected():
                m.job_rejected(event.inbox, event.reason)
            case events.ModelLoaded():
                m.model_loaded(event.model, event.device, event.seconds)
            case events.ModelUnloaded():
                m.model_unloaded(event.model, event.device, event.reason)
            case events.ModelsLoaded():
                m.set_models_loaded(event.device, event.models)
            case events.WorkerRestarted():
                m.worker_restarted(event.slot, event.reason)
            case events.DeviceHealth():
                m.device_health_changed(event.device, event.healthy)
            case events.CpuFallback():
                m.cpu_fallback(event.model)
