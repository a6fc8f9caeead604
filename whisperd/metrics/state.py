"""What a scrape reads at scrape time: part of metrics.

`StateCollector` turns the job store's counts, the running jobs' progress,
the GPUs (through devices.probe.DeviceProbe) and each worker process's memory
into gauges when Prometheus scrapes; nothing here is updated in between, so
a scrape always shows things as they are. `RunningJobView` and `WorkerView`
are the shapes the daemon and the pool hand it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from whisperd.devices.probe import BAD_THROTTLE_REASON_NAMES, DeviceProbe, DeviceReading
from whisperd.jobs import JobState


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


class StateCollector:
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
