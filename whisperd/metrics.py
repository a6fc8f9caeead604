"""Prometheus metrics for whisperd (layer L2).

`Metrics` owns a private CollectorRegistry. The daemon and the pool record
what happens through its hook methods (job_queued, job_finished, ...), never
by touching metric objects inside their loops. What is a state rather than an
event -- queue depth, running jobs' progress and ETA, GPU memory and health,
each worker process's memory -- is read at scrape time from callables given
to the constructor, so a scrape always shows the job store and the hardware
as they are.

Label values are bounded: inbox, device, model and slot names come from the
config and the hardware; outcome, phase, reason and kind come from the fixed
tuples below, and anything else is counted as "other" (and logged), so a
caller's typo can neither explode the series count nor crash a hook. File
names and job ids never become label values.

`MetricsServer` serves the registry over HTTP on a thread it owns.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric

from whisperd.bounded_http import BoundedThreads
from whisperd.jobs import JobState
from whisperd.protocols import BAD_THROTTLE_REASON_NAMES, DeviceProbe, DeviceReading

_log = structlog.stdlib.get_logger(__name__)

# Bounded label values. A value outside its tuple is recorded as "other".
# How an attempt ended. "rejected": the file broke an inbox rule (too large,
# too long, not media) -- the file's fault, so it stays out of failure rates;
# "retry": the attempt failed and the job went back to the queue; "lease_lost":
# another worker owns the job now. Only done/failed/cancelled/rejected end a job.
OUTCOMES = ("done", "failed", "cancelled", "rejected", "retry", "lease_lost")
CANCEL_PHASES = ("queued", "running")
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


def gpu_device_label(index: int) -> str:
    """The `device` label of GPU `index` ("cuda:0"): the pool names its
    devices the same way so GPU gauges and job metrics line up."""
    return f"cuda:{index}"


@dataclass(frozen=True)
class RunningJobView:
    """What a scrape shows about one running job (job_id is not a label)."""

    job_id: int
    inbox: str
    # Device label the job runs on, e.g. "cuda:0" or "cpu".
    device: str
    # Fraction of the audio decoded so far, 0..1.
    progress: float
    # Seconds until it is decoded, from its own rate (None: not yet known).
    eta_seconds: float | None = None


@dataclass(frozen=True)
class WorkerView:
    """A worker process, as a scrape reads its memory."""

    # Slot name ("cpu-0", "gpu0-0") and the torch device it runs on.
    slot: str
    device: str
    # NVML index of the slot's GPU; None for a CPU slot (no GPU series).
    gpu_index: int | None
    pid: int


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of a live process (VmRSS of /proc/PID/status); None
    for a process that is gone, or a zombie, which has no VmRSS."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel writes "VmRSS:  1234 kB"
    except OSError:
        return None
    return None


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
        self._build_info(version)
        if instance:
            self._instance_info(instance)
        # The state collector goes first: a source failing during a scrape is
        # then already counted in whisperd_scrape_errors_total of that scrape.
        self.registry.register(
            _StateCollector(
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
            "Jobs whose start-up recovery or sweep step raised (logged with the job; retried next sweep).",
            ["stage"],
            registry=r,
        )
        self._define_model_metrics()
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


class _StateCollector:
    """Reads the job store, the running jobs and the GPUs at scrape time."""

    def __init__(
        self,
        *,
        job_counts: Callable[[], Mapping[str, int]],
        claimable_jobs: Callable[[], int] | None,
        running_jobs: Callable[[], Sequence[RunningJobView]],
        devices: DeviceProbe | None,
        workers: Callable[[], Sequence[WorkerView]],
        on_error: Callable[[str, Exception], None],
    ) -> None:
        self._job_counts = job_counts
        self._claimable_jobs = claimable_jobs
        self._running_jobs = running_jobs
        self._devices = devices
        self._workers = workers
        self._on_error = on_error

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not call the sources.
        return [
            *self._job_families(),
            *self._running_families(),
            *self._gpu_families().values(),
            *self._worker_families(),
        ]

    def collect(self) -> Iterator[Metric]:
        yield from self._guarded("jobs", self._collect_jobs)
        yield from self._guarded("running", self._collect_running)
        if self._devices is not None:
            yield from self._guarded("gpus", self._collect_gpus)
        yield from self._guarded("workers", self._collect_workers)

    def _guarded(self, name: str, collect: Callable[[], list[Metric]]) -> list[Metric]:
        try:
            return collect()
        except Exception as exc:  # noqa: BLE001  (a failing source must not fail the whole scrape)
            self._on_error(name, exc)
            return []

    @staticmethod
    def _job_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "whisperd_jobs",
                # The whole store's count: every instance sharing it reports the same numbers.
                "Jobs in the whole job store, by state (the same on every instance sharing it: "
                "aggregate with max, not sum).",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "whisperd_jobs_claimable",
                # Per instance, so an alert can ask each host about its own work.
                "Queued jobs this instance may claim: of the inboxes it watches, not paused "
                "(another host's private inboxes are not counted).",
            ),
        ]

    @staticmethod
    def _running_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "whisperd_running_jobs", "Jobs this instance's workers run now.", labels=["inbox", "device"]
            ),
            GaugeMetricFamily(
                "whisperd_running_job_progress_ratio",
                "Progress (0..1) of the least advanced running job: a stuck job is not hidden by others.",
                labels=["inbox", "device"],
            ),
            GaugeMetricFamily(
                "whisperd_running_job_eta_seconds",
                "Seconds until the running job that will take longest is decoded, from its own "
                "rate since its model was loaded (absent while no job's ETA is known).",
                labels=["inbox", "device"],
            ),
        ]

    @staticmethod
    def _gpu_families() -> dict[str, GaugeMetricFamily]:
        def gauge(name: str, doc: str, labels: Sequence[str] = ("device",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        return {
            "info": gauge("whisperd_gpu_info", "Always 1; names each GPU.", ("device", "name", "uuid")),
            "healthy": gauge(
                "whisperd_gpu_healthy",
                "1 when the driver answers, there is no uncorrectable ECC error and no hardware, "
                "thermal or power-brake slowdown.",
            ),
            "used": gauge("whisperd_gpu_memory_used_bytes", "GPU memory in use (all processes)."),
            "total": gauge("whisperd_gpu_memory_total_bytes", "GPU memory on the card."),
            "util": gauge("whisperd_gpu_utilization_ratio", "Share of time the GPU was busy (0..1)."),
            "temp": gauge("whisperd_gpu_temperature_celsius", "GPU core temperature."),
            "throttled": gauge(
                "whisperd_gpu_throttled",
                "1 while the GPU is slowed down for this reason.",
                ("device", "reason"),
            ),
            "ecc": gauge(
                "whisperd_gpu_ecc_uncorrected_errors",
                "Uncorrectable ECC errors since the driver loaded.",
            ),
        }

    def _collect_jobs(self) -> list[Metric]:
        counts = self._job_counts()
        family, claimable = self._job_families()
        # Every state is shown, so "no failed jobs" is a 0 rather than a gap.
        states = [state.value for state in JobState]
        for state in [*states, *sorted(set(counts) - set(states))]:
            family.add_metric([state], float(counts.get(state, 0)))
        if self._claimable_jobs is None:
            return [family]
        claimable.add_metric([], float(self._claimable_jobs()))
        return [family, claimable]

    def _collect_running(self) -> list[Metric]:
        grouped: dict[tuple[str, str], list[RunningJobView]] = {}
        for job in self._running_jobs():
            grouped.setdefault((job.inbox, job.device), []).append(job)
        running, progress, eta = self._running_families()
        for (inbox, device), jobs in sorted(grouped.items()):
            running.add_metric([inbox, device], float(len(jobs)))
            progress.add_metric([inbox, device], min(min(max(j.progress, 0.0), 1.0) for j in jobs))
            etas = [max(j.eta_seconds, 0.0) for j in jobs if j.eta_seconds is not None]
            if etas:
                eta.add_metric([inbox, device], max(etas))
        return [running, progress, eta]

    @staticmethod
    def _worker_families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "whisperd_worker_rss_bytes",
                "Resident memory of each worker process (its loaded models, audio and engine).",
                labels=["slot"],
            ),
            GaugeMetricFamily(
                "whisperd_worker_gpu_memory_bytes",
                "GPU memory each GPU slot's worker process holds, as the driver reports it.",
                labels=["slot", "device"],
            ),
        ]

    def _collect_workers(self) -> list[Metric]:
        rss, gpu = self._worker_families()
        for worker in self._workers():
            resident = process_rss_bytes(worker.pid)
            if resident is None:
                continue  # exited since the pool listed it: the next scrape shows its successor
            rss.add_metric([worker.slot], float(resident))
            if worker.gpu_index is None or self._devices is None:
                continue
            held = self._devices.read_process_gpu_memory(worker.gpu_index, worker.pid)
            if held is not None:
                gpu.add_metric([worker.slot, gpu_device_label(worker.gpu_index)], float(held))
        return [rss, gpu]

    def _collect_gpus(self) -> list[Metric]:
        assert self._devices is not None
        families = self._gpu_families()
        for info in self._devices.devices():
            device = gpu_device_label(info.index)
            families["info"].add_metric([device, info.name, info.uuid], 1.0)
            _add_reading(families, device, self._devices.read(info.index))
        return list(families.values())


def _add_reading(families: Mapping[str, GaugeMetricFamily], device: str, reading: DeviceReading) -> None:
    families["healthy"].add_metric([device], 1.0 if reading.healthy else 0.0)
    if not reading.ok:
        return
    families["used"].add_metric([device], float(reading.memory_used_bytes))
    families["total"].add_metric([device], float(reading.memory_total_bytes))
    if reading.utilization_percent is not None:
        families["util"].add_metric([device], reading.utilization_percent / 100.0)
    if reading.temperature_c is not None:
        families["temp"].add_metric([device], reading.temperature_c)
    for reason in BAD_THROTTLE_REASON_NAMES:
        families["throttled"].add_metric(
            [device, reason], 1.0 if reason in reading.bad_throttle_reasons else 0.0
        )
    if reading.ecc_uncorrected is not None:
        families["ecc"].add_metric([device], float(reading.ecc_uncorrected))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("metrics.request", message=format % args)


class _Server(BoundedThreads, WSGIServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn(), a DNS query
        # that can stall start-up on a machine without a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called from inside an except block. The default prints a traceback
        # to stderr; a client that hung up or timed out is routine.
        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, OSError) else logging.WARNING
        _log.log(level, "metrics.request_failed", client=str(client_address), error=repr(error))


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves `metrics.registry` at http://host:port/metrics on a thread it owns.

    host: the address to listen on; loopback by default, so the metrics are
    not exposed beyond the machine unless configured. port: 0 picks a free
    port (see bound_port). Each connection has its own thread (a bounded
    number, see bounded_http) and client_timeout seconds in all, so a client
    that trickles bytes blocks neither scrapes nor stop().
    """

    # How often the serving loop looks at its stop event, in seconds.
    POLL_SECONDS = 0.25

    def __init__(
        self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9310, *, client_timeout: float = 10.0
    ) -> None:
        """client_timeout: seconds a connection may stay open in all (and
        wait for any one read), however slowly its client sends."""
        self._app = make_wsgi_app(metrics.registry)
        self._host = host
        self._port = port
        self._client_timeout = client_timeout
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server has not been started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and start serving; raises OSError naming the address if the
        port cannot be had."""
        if self._thread is not None:
            raise RuntimeError("the metrics server was already started")
        server_class = _Server6 if ":" in self._host else _Server
        try:
            server = make_server(
                self._host,
                self._port,
                self._app,
                server_class=server_class,
                handler_class=self._handler_class(),
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics: cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        assert isinstance(server, _Server)
        self._server = server
        self._server.timeout = self.POLL_SECONDS
        self._server.request_deadline = self._client_timeout
        self._thread = threading.Thread(target=self._serve, name="whisperd-metrics")
        self._thread.start()
        _log.info("metrics.listening", host=self._host, port=self.bound_port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait up to `timeout` seconds for the thread."""
        self._stopping.set()
        self.join(timeout)
        if self._thread is not None and self._thread.is_alive():
            _log.warning("metrics.stop_timeout", timeout=timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _handler_class(self) -> type[WSGIRequestHandler]:
        # StreamRequestHandler reads its socket timeout from the class.
        return type("_Handler", (_QuietHandler,), {"timeout": self._client_timeout})

    def _serve(self) -> None:
        server = self._server
        assert server is not None
        try:
            while not self._stopping.is_set():
                # Accepts one connection (its own thread serves it), or
                # returns after POLL_SECONDS idle.
                server.handle_request()
                server.expire_stuck()
        finally:
            server.close_clients(self.POLL_SECONDS * 4)
            server.server_close()
