"""Metrics as Prometheus scrapes them: over HTTP from a real server, checked by promtool."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from whisperd.metrics import Metrics, MetricsServer, RunningJobView
from whisperd.nvml import THROTTLE_HW_THERMAL, DeviceInfo, ScriptedProbe, idle_reading

GIB = 1024**3
H100 = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_total_bytes=80 * GIB)
L4 = DeviceInfo(index=1, name="NVIDIA L4", uuid="GPU-bbbb", memory_total_bytes=24 * GIB)


@dataclass
class DaemonState:
    """What the daemon's store and pool would answer at scrape time."""

    counts: dict[str, int] = field(default_factory=dict)
    running: list[RunningJobView] = field(default_factory=list)
    broken: bool = False

    def job_counts(self) -> Mapping[str, int]:
        if self.broken:
            raise ConnectionError("database is locked")
        return self.counts

    def running_jobs(self) -> Sequence[RunningJobView]:
        return self.running


@pytest.fixture
def state() -> DaemonState:
    return DaemonState()


@pytest.fixture
def probe() -> ScriptedProbe:
    return ScriptedProbe([H100, L4])


@pytest.fixture
def metrics(state: DaemonState, probe: ScriptedProbe) -> Metrics:
    return Metrics(
        job_counts=state.job_counts, running_jobs=state.running_jobs, devices=probe, version="1.2.3"
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
    server: MetricsServer, metrics: Metrics, state: DaemonState
) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    state.counts = {"queued": 2, "running": 1}
    state.running = [RunningJobView(job_id=1, inbox="meetings", device="cuda:0", progress=0.5)]
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


def test_queue_depth_is_read_from_the_store_at_scrape_time(server: MetricsServer, state: DaemonState) -> None:
    state.counts = {"queued": 4}
    first = scrape_text(server)
    state.counts = {"queued": 1, "running": 2, "done": 30}
    second = scrape_text(server)
    assert value(first, "whisperd_jobs", state="queued") == 4
    assert value(first, "whisperd_jobs", state="failed") == 0  # every state is shown
    assert value(second, "whisperd_jobs", state="queued") == 1
    assert value(second, "whisperd_jobs", state="done") == 30


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
    server: MetricsServer, state: DaemonState
) -> None:
    state.running = [
        RunningJobView(job_id=1, inbox="meetings", device="cuda:0", progress=0.9),
        RunningJobView(job_id=2, inbox="meetings", device="cuda:0", progress=0.25),
        RunningJobView(job_id=3, inbox="lectures", device="cpu", progress=1.7),  # clamped
    ]
    text = scrape_text(server)
    assert value(text, "whisperd_running_jobs", inbox="meetings", device="cuda:0") == 2
    assert value(text, "whisperd_running_job_progress_ratio", inbox="meetings", device="cuda:0") == 0.25
    assert value(text, "whisperd_running_job_progress_ratio", inbox="lectures", device="cpu") == 1.0
    assert 'job_id="' not in text
    state.running = []
    assert value(scrape_text(server), "whisperd_running_jobs", inbox="meetings", device="cuda:0") is None


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


def test_a_failing_source_costs_only_its_own_series(server: MetricsServer, state: DaemonState) -> None:
    state.broken = True
    with capture_logs() as events:
        text = scrape_text(server)
    assert value(text, "whisperd_jobs", state="queued") is None
    assert value(text, "whisperd_gpu_healthy", device="cuda:0") == 1
    assert value(text, "whisperd_scrape_errors_total", collector="jobs") == 1
    assert any(e["event"] == "metrics.collector_failed" and "locked" in e["error"] for e in events)
    state.broken = False
    assert value(scrape_text(server), "whisperd_jobs", state="queued") == 0


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
