"""Metrics as Prometheus scrapes them: over HTTP from a real server, checked by promtool."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import require_tool
from tests.fake_nvml import ScriptedProbe, idle_reading
from whisperd.daemon.views import store_job_counts, store_running_jobs
from whisperd.devices.probe import THROTTLE_HW_THERMAL, DeviceInfo
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, Job, JobSpec, JobState
from whisperd.metrics.registry import Metrics
from whisperd.metrics.server import MetricsServer
from whisperd.metrics.state import WorkerView
from whisperd.store.job_store import JobStore

GIB = 1024**3
H100 = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_total_bytes=80 * GIB)
L4 = DeviceInfo(index=1, name="NVIDIA L4", uuid="GPU-bbbb", memory_total_bytes=24 * GIB)


class StoreWithJobs:
    """A real SQLite job store, and real jobs put in it the way the daemon does."""

    def __init__(self, path: Path) -> None:
        self.store = JobStore.open(f"sqlite:///{path}")
        self.root = path.parent
        self._made = 0
        self._tokens: dict[int, str] = {}

    def add(
        self, inbox: str, state: JobState = JobState.QUEUED, *, device: str = "cpu", progress: float = 0.0
    ) -> Job:
        """A new job of `inbox`, left queued, or claimed on `device` (running
        at `progress`), or claimed and done."""
        self._made += 1
        spec = JobSpec(
            inbox=inbox, inbox_root=str(self.root / inbox), rel_path=f"{self._made}.wav", model="tiny.en"
        )
        identity = FileIdentity(device=1, inode=self._made, size=100, mtime_ns=self._made)
        job, created = self.store.enqueue(spec, identity, max_attempts=3)
        assert created
        if state is not JobState.QUEUED:
            self.start(job, device=device, progress=progress)
        if state is JobState.DONE:
            self.finish(job)
        return job

    def start(self, job: Job, *, device: str = "cpu", progress: float = 0.0) -> None:
        claim = self.store.claim(
            worker=f"w{job.id}", device=device, lease_seconds=600, inboxes=[job.spec.inbox]
        )
        assert claim is not None and claim.job.id == job.id, "claim the oldest queued job of its inbox"
        self._tokens[job.id] = claim.token
        if progress:
            self.store.heartbeat(job.id, claim.token, lease_seconds=600, progress=progress)

    def token_of(self, job: Job) -> str:
        return self._tokens[job.id]

    def finish(self, job: Job) -> None:
        assert self.store.end_attempt(job.id, self._tokens[job.id], AttemptEnd(outcome=AttemptOutcome.DONE))


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[StoreWithJobs]:
    made = StoreWithJobs(tmp_path / "jobs.db")
    yield made
    made.store.close()


@pytest.fixture
def probe() -> ScriptedProbe:
    return ScriptedProbe([H100, L4])


@pytest.fixture
def metrics(jobs: StoreWithJobs, probe: ScriptedProbe) -> Metrics:
    # Wired to the store as the daemon wires it.
    return Metrics(
        job_counts=lambda: store_job_counts(jobs.store),
        running_jobs=lambda: store_running_jobs(jobs.store),
        devices=probe,
        version="1.2.3",
        # This instance serves "meetings" only.
        claimable_jobs=lambda: jobs.store.claimable_count(["meetings"]),
    )


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    server.start()
    yield server
    server.stop(timeout=10)


def scrape_text(server: MetricsServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.bound_port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, metric: str, **labels: str) -> float | None:
    return samples(text).get((metric, frozenset(labels.items())))


def names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def test_a_scrape_over_http_passes_promtool(
    server: MetricsServer, metrics: Metrics, jobs: StoreWithJobs
) -> None:
    require_tool("promtool", "prometheus")
    jobs.add("meetings", JobState.RUNNING, device="cuda:0", progress=0.5)
    jobs.add("meetings")
    jobs.add("meetings")
    exercise_every_hook(metrics)
    text = scrape_text(server)
    check = subprocess.run(
        ["promtool", "check", "metrics"], check=False, input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def exercise_every_hook(metrics: Metrics) -> None:
    metrics.job_queued("meetings")
    metrics.job_started("meetings", "cuda:0", queue_wait_seconds=12)
    metrics.job_finished("meetings", "done", device="cuda:0", duration_seconds=6, audio_seconds=60)
    metrics.job_retried("meetings")
    metrics.job_cancelled("meetings", was_running=False)
    metrics.job_rejected("meetings", "too_large")
    metrics.worker_restarted("cuda:0/0", "crashed")
    metrics.model_loaded("tiny.en", "cuda:0", 1.5)
    metrics.model_unloaded("tiny.en", "cuda:0", "idle")
    metrics.set_models_loaded("cuda:0", ["base"])
    metrics.cpu_fallback("large-v3")
    metrics.device_health_changed("cuda:0", healthy=True)
    metrics.watcher_event("created")
    metrics.rescan_completed(1_700_000_000.0)
    metrics.rescan_interval(60.0)
    metrics.job_handling_failed("recover")
    metrics.store_changed(True)
    metrics.store_error()
    metrics.set_sources_stuck(0)
    metrics.hook_delivery("meetings", "webhook", "delivered")


def test_queue_depth_is_read_from_the_store_at_scrape_time(
    server: MetricsServer, jobs: StoreWithJobs
) -> None:
    queued = [jobs.add("meetings") for _ in range(4)]
    first = scrape_text(server)
    for job in queued[:3]:  # the queue moves on between scrapes
        jobs.start(job)
    jobs.finish(queued[0])
    second = scrape_text(server)
    assert value(first, "whisperd_jobs", state="queued") == 4
    assert value(first, "whisperd_jobs", state="failed") == 0  # every state is shown
    assert value(second, "whisperd_jobs", state="queued") == 1
    assert value(second, "whisperd_jobs", state="running") == 2
    assert value(second, "whisperd_jobs", state="done") == 1


def test_claimable_jobs_are_only_this_instances_unpaused_queue(
    server: MetricsServer, jobs: StoreWithJobs
) -> None:
    jobs.add("meetings", JobState.RUNNING)
    for inbox in ("meetings", "meetings", "another-hosts-inbox"):
        jobs.add(inbox)
    text = scrape_text(server)
    assert value(text, "whisperd_jobs", state="queued") == 3  # the whole store
    assert value(text, "whisperd_jobs_claimable") == 2  # what this instance can do
    jobs.store.pause_inbox("meetings")
    paused = scrape_text(server)
    assert value(paused, "whisperd_jobs", state="queued") == 3
    assert value(paused, "whisperd_jobs_claimable") == 0  # paused on purpose: not stuck


def test_a_finished_job_moves_the_counters_and_histograms(server: MetricsServer, metrics: Metrics) -> None:
    before = scrape_text(server)
    metrics.job_queued("meetings")
    metrics.job_started("meetings", "cuda:0", queue_wait_seconds=3.0)
    metrics.job_finished("meetings", "done", device="cuda:0", duration_seconds=6.0, audio_seconds=60.0)
    metrics.job_finished("meetings", "failed", device="cuda:0", duration_seconds=2.0, audio_seconds=None)
    after = scrape_text(server)

    assert value(before, "whisperd_jobs_finished_total", inbox="meetings", outcome="done") is None
    assert value(after, "whisperd_jobs_queued_total", inbox="meetings") == 1
    assert value(after, "whisperd_jobs_finished_total", inbox="meetings", outcome="done") == 1
    assert value(after, "whisperd_jobs_finished_total", inbox="meetings", outcome="failed") == 1
    assert value(after, "whisperd_job_queue_wait_seconds_count", inbox="meetings") == 1
    # Both outcomes took device time; only the completed job counts as audio.
    assert value(after, "whisperd_job_duration_seconds_sum", inbox="meetings", device="cuda:0") == 8.0
    assert value(after, "whisperd_job_realtime_factor_count", inbox="meetings", device="cuda:0") == 1
    assert value(
        after, "whisperd_job_realtime_factor_sum", inbox="meetings", device="cuda:0"
    ) == pytest.approx(0.1)
    assert (
        value(after, "whisperd_job_realtime_factor_bucket", inbox="meetings", device="cuda:0", le="0.05") == 0
    )
    assert (
        value(after, "whisperd_job_realtime_factor_bucket", inbox="meetings", device="cuda:0", le="0.1") == 1
    )
    assert value(after, "whisperd_audio_seconds_total", inbox="meetings") == 60.0


def test_cancels_rejections_restarts_and_watcher_events(server: MetricsServer, metrics: Metrics) -> None:
    metrics.job_cancelled("meetings", was_running=True)
    metrics.job_cancelled("meetings", was_running=False)
    metrics.job_cancelled("meetings", was_running=False)
    metrics.job_rejected("meetings", "symlink")
    metrics.job_retried("meetings")
    metrics.worker_restarted("cuda:0/0", "hung")
    metrics.watcher_event("moved")
    metrics.cpu_fallback("large-v3")
    metrics.rescan_completed(1_700_000_123.5)
    text = scrape_text(server)
    assert value(text, "whisperd_job_cancels_total", inbox="meetings", phase="queued") == 2
    assert value(text, "whisperd_job_cancels_total", inbox="meetings", phase="running") == 1
    assert value(text, "whisperd_jobs_rejected_total", inbox="meetings", reason="symlink") == 1
    assert value(text, "whisperd_job_retries_total", inbox="meetings") == 1
    assert value(text, "whisperd_worker_restarts_total", slot="cuda:0/0", reason="hung") == 1
    assert value(text, "whisperd_watcher_events_total", kind="moved") == 1
    assert value(text, "whisperd_cpu_fallbacks_total", model="large-v3") == 1
    assert value(text, "whisperd_last_rescan_timestamp_seconds") == 1_700_000_123.5


def test_unknown_label_values_are_counted_as_other_and_logged_once(
    server: MetricsServer, metrics: Metrics
) -> None:
    with capture_logs() as events:
        metrics.job_rejected("meetings", "/srv/transcribe/inbox/secret name.mp3")
        metrics.job_rejected("meetings", "/srv/transcribe/inbox/secret name.mp3")
        metrics.worker_restarted("cuda:0/0", "cosmic rays")
    text = scrape_text(server)
    assert "secret name" not in text and "cosmic" not in text
    assert value(text, "whisperd_jobs_rejected_total", inbox="meetings", reason="other") == 2
    assert value(text, "whisperd_worker_restarts_total", slot="cuda:0/0", reason="other") == 1
    assert [e["event"] for e in events] == ["metrics.unknown_label", "metrics.unknown_label"]


def test_models_loaded_follow_loads_unloads_and_snapshots(server: MetricsServer, metrics: Metrics) -> None:
    metrics.model_loaded("tiny.en", "cuda:0", seconds=2.5)
    metrics.model_loaded("large-v3", "cuda:0", seconds=40.0)
    loaded = scrape_text(server)
    metrics.model_unloaded("large-v3", "cuda:0", "pressure")
    unloaded = scrape_text(server)
    metrics.set_models_loaded("cuda:0", ["base"])
    snapshot = scrape_text(server)

    assert value(loaded, "whisperd_models_loaded", model="large-v3", device="cuda:0") == 1
    assert value(loaded, "whisperd_model_load_seconds_sum", model="large-v3", device="cuda:0") == 40.0
    assert value(unloaded, "whisperd_models_loaded", model="large-v3", device="cuda:0") == 0
    assert (
        value(unloaded, "whisperd_model_unloads_total", model="large-v3", device="cuda:0", reason="pressure")
        == 1
    )
    assert value(snapshot, "whisperd_models_loaded", model="base", device="cuda:0") == 1
    assert value(snapshot, "whisperd_models_loaded", model="tiny.en", device="cuda:0") == 0
    assert value(snapshot, "whisperd_model_loads_total", model="tiny.en", device="cuda:0") == 1


def test_running_jobs_show_count_and_least_progress_per_inbox_and_device(
    server: MetricsServer, jobs: StoreWithJobs
) -> None:
    running = [
        jobs.add("meetings", JobState.RUNNING, device="cuda:0", progress=0.9),
        jobs.add("meetings", JobState.RUNNING, device="cuda:0", progress=0.25),
        jobs.add("lectures", JobState.RUNNING, device="cpu", progress=1.7),  # a worker overshooting
    ]
    text = scrape_text(server)
    assert value(text, "whisperd_running_jobs", inbox="meetings", device="cuda:0") == 2
    assert value(text, "whisperd_running_job_progress_ratio", inbox="meetings", device="cuda:0") == 0.25
    assert value(text, "whisperd_running_job_progress_ratio", inbox="lectures", device="cpu") == 1.0
    assert 'job_id="' not in text
    for job in running:
        jobs.finish(job)
    assert value(scrape_text(server), "whisperd_running_jobs", inbox="meetings", device="cuda:0") is None


MIB = 2**20

# A process that holds `MiB` of touched memory until its stdin closes, and
# says so once it does.
HOLDER = """
import sys
held = bytearray(int(sys.argv[1]) * 2**20)
held[::4096] = b"x" * len(held[::4096])
print("holding", flush=True)
sys.stdin.read()
"""


def holding(mib: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "holding\n"
    return process


def test_each_worker_process_shows_its_resident_memory_and_gpu_slots_their_gpu_memory(
    jobs: StoreWithJobs, probe: ScriptedProbe
) -> None:
    big, small, gone = holding(300), holding(1), holding(1)
    gone.communicate("")  # exited and reaped, as a worker the pool is replacing
    workers: Sequence[WorkerView] = [
        WorkerView(slot="cpu-0", device="cpu", gpu_index=None, pid=small.pid),
        WorkerView(slot="gpu0-0", device="cuda:0", gpu_index=0, pid=big.pid),
        WorkerView(slot="gpu1-0", device="cuda:1", gpu_index=1, pid=gone.pid),
    ]
    probe.set_process_memory(0, big.pid, 2 * GIB)
    metrics = Metrics(
        job_counts=lambda: store_job_counts(jobs.store),
        running_jobs=lambda: store_running_jobs(jobs.store),
        devices=probe,
        version="1",
        workers=lambda: workers,
    )
    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    server.start()
    try:
        text = scrape_text(server)
    finally:
        server.stop(timeout=10)
        for process in (big, small):
            process.communicate("")
    big_rss = value(text, "whisperd_worker_rss_bytes", slot="gpu0-0")
    small_rss = value(text, "whisperd_worker_rss_bytes", slot="cpu-0")
    assert big_rss is not None and big_rss >= 300 * MIB, text
    assert small_rss is not None and 0 < small_rss < 300 * MIB, text
    assert value(text, "whisperd_worker_gpu_memory_bytes", slot="gpu0-0", device="cuda:0") == 2 * GIB
    # A CPU slot has no GPU series; a process that is gone has no series at all.
    assert 'whisperd_worker_gpu_memory_bytes{device="cpu"' not in text
    assert not [line for line in text.splitlines() if "cpu-0" in line and "gpu_memory" in line]
    assert "gpu1-0" not in text


def test_running_jobs_show_the_longest_eta_per_inbox_and_device(
    server: MetricsServer, jobs: StoreWithJobs
) -> None:
    first = jobs.add("meetings", JobState.RUNNING, device="cuda:0", progress=0.5)
    second = jobs.add("meetings", JobState.RUNNING, device="cuda:0", progress=0.2)
    jobs.add("lectures", JobState.RUNNING, device="cpu", progress=0.1)  # no ETA known yet
    for job, eta in ((first, 12.0), (second, 95.0)):
        jobs.store.heartbeat(job.id, jobs.token_of(job), lease_seconds=600, eta_seconds=eta)
    text = scrape_text(server)
    assert value(text, "whisperd_running_job_eta_seconds", inbox="meetings", device="cuda:0") == 95.0
    assert value(text, "whisperd_running_job_eta_seconds", inbox="lectures", device="cpu") is None
    assert value(text, "whisperd_running_jobs", inbox="lectures", device="cpu") == 1


def test_gpu_gauges_come_from_the_probe_at_scrape_time(server: MetricsServer, probe: ScriptedProbe) -> None:
    probe.script(0, idle_reading(H100, used_bytes=30 * GIB, utilization_percent=75.0, temperature_c=66.0))
    probe.script(1, "GPU is lost")
    text = scrape_text(server)
    assert value(text, "whisperd_gpu_memory_used_bytes", device="cuda:0") == 30 * GIB
    assert value(text, "whisperd_gpu_memory_total_bytes", device="cuda:0") == 80 * GIB
    assert value(text, "whisperd_gpu_utilization_ratio", device="cuda:0") == 0.75
    assert value(text, "whisperd_gpu_temperature_celsius", device="cuda:0") == 66.0
    assert value(text, "whisperd_gpu_healthy", device="cuda:0") == 1
    assert value(text, "whisperd_gpu_info", device="cuda:1", name="NVIDIA L4", uuid="GPU-bbbb") == 1
    # The lost GPU is unhealthy and has no memory figures rather than stale ones.
    assert value(text, "whisperd_gpu_healthy", device="cuda:1") == 0
    assert value(text, "whisperd_gpu_memory_used_bytes", device="cuda:1") is None

    probe.script(1, idle_reading(L4, throttle_reasons=THROTTLE_HW_THERMAL))
    probe.script(0, idle_reading(H100, ecc_uncorrected=3))
    text = scrape_text(server)
    assert value(text, "whisperd_gpu_healthy", device="cuda:1") == 0
    assert value(text, "whisperd_gpu_throttled", device="cuda:1", reason="hw_thermal") == 1
    assert value(text, "whisperd_gpu_throttled", device="cuda:1", reason="hw_power_brake") == 0
    assert value(text, "whisperd_gpu_healthy", device="cuda:0") == 0
    assert value(text, "whisperd_gpu_ecc_uncorrected_errors", device="cuda:0") == 3


def test_device_health_set_by_the_pool(server: MetricsServer, metrics: Metrics) -> None:
    metrics.device_health_changed("cuda:1", healthy=False)
    assert value(scrape_text(server), "whisperd_device_healthy", device="cuda:1") == 0
    metrics.device_health_changed("cuda:1", healthy=True)
    assert value(scrape_text(server), "whisperd_device_healthy", device="cuda:1") == 1


def test_a_failing_source_costs_only_its_own_series(jobs: StoreWithJobs, probe: ScriptedProbe) -> None:
    # The real store behind a source that fails its first read, as a locked
    # or unreachable database does.
    failures = [ConnectionError("database is locked")]

    def job_counts() -> dict[str, int]:
        if failures:
            raise failures.pop()
        return store_job_counts(jobs.store)

    metrics = Metrics(
        job_counts=job_counts, running_jobs=lambda: store_running_jobs(jobs.store), devices=probe, version="1"
    )
    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    server.start()
    try:
        with capture_logs() as events:
            text = scrape_text(server)
        after = scrape_text(server)
    finally:
        server.stop(timeout=10)
    assert value(text, "whisperd_jobs", state="queued") is None
    assert value(text, "whisperd_gpu_healthy", device="cuda:0") == 1
    assert value(text, "whisperd_scrape_errors_total", collector="jobs") == 1
    assert any(e["event"] == "metrics.collector_failed" and "locked" in e["error"] for e in events)
    assert value(after, "whisperd_jobs", state="queued") == 0


def test_build_info_and_process_metrics() -> None:
    metrics = Metrics(job_counts=dict, running_jobs=list, devices=None, version="9.9.9")
    server = MetricsServer(metrics, port=0)
    server.start()
    try:
        text = scrape_text(server)
    finally:
        server.stop()
    (build,) = [labels for (name, labels) in samples(text) if name == "whisperd_build_info"]
    assert ("version", "9.9.9") in build
    assert "process_resident_memory_bytes" in names(text)
    assert not any(name.startswith("whisperd_gpu_") for name in names(text))  # no probe, no GPU series


def test_each_instance_has_its_own_registry() -> None:
    first = Metrics(job_counts=dict, running_jobs=list, devices=None, version="1")
    second = Metrics(job_counts=dict, running_jobs=list, devices=None, version="1")
    first.job_queued("a")
    assert first.registry.get_sample_value("whisperd_jobs_queued_total", {"inbox": "a"}) == 1
    assert second.registry.get_sample_value("whisperd_jobs_queued_total", {"inbox": "a"}) is None


def test_the_server_listens_on_loopback_and_stops(metrics: Metrics) -> None:
    server = MetricsServer(metrics, port=0)
    with pytest.raises(RuntimeError):
        _ = server.bound_port
    server.start()
    port = server.bound_port
    assert port > 0
    with pytest.raises(RuntimeError):
        server.start()
    server.stop(timeout=10)
    assert not server.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_stalled_client_does_not_stop_the_server_from_stopping(metrics: Metrics) -> None:
    server = MetricsServer(metrics, port=0, client_timeout=1.0)
    server.start()
    with socket.create_connection(("127.0.0.1", server.bound_port), timeout=5):
        # Connected but sends nothing; stop() must still end the thread, at
        # the latest when the handler's socket timeout gives up on the client.
        server.stop(timeout=30)
    assert not server.is_alive()


def test_a_port_in_use_is_refused_naming_the_address(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(metrics, port=port)
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            server.start()


def test_scrapes_go_on_after_a_stalled_or_garbled_client(metrics: Metrics) -> None:
    server = MetricsServer(metrics, port=0, client_timeout=1.0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=5) as garbled:
            garbled.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert b" 400 " in garbled.recv(4096)
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=5):
            # This client never speaks: the scrape is served once it times out.
            assert "whisperd_build_info" in scrape_text(server)
    finally:
        server.stop(timeout=10)
