"""The worker pool and the models its workers keep: slots, the RAM budget,
idle unloading, torch's thread cap, device health, silent workers, hung jobs.

There is no GPU here. The daemon tests run the real `whisperd run` on the CPU
with the real tiny.en model (imported a second time as `tiny-b`, so that two
models compete for memory). The health tests drive a `WorkerPool` directly,
with real worker processes whose slot stands for GPU 0 while computing on the
CPU; only the NVML readings are scripted (`fake_nvml.ScriptedProbe`, the
hardware seam). Real SQLite stores, real clips, real signals throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from tests.fake_nvml import ScriptedProbe, idle_reading
from whisperd.config import Config, DaemonConfig, ModelsConfig, WorkersConfig
from whisperd.daemon.root import Daemon
from whisperd.devices.probe import THROTTLE_HW_SLOWDOWN, THROTTLE_HW_THERMAL, DeviceInfo
from whisperd.errors import WhisperdError
from whisperd.events import WorkerEvent
from whisperd.jobs import DecodeOptions, FileIdentity, Job, JobSpec, JobState
from whisperd.lifecycle import Lifecycle
from whisperd.store.job_store import JobStore
from whisperd.workers.channel import WorkerSettings
from whisperd.workers.pool import WorkerPool
from whisperd.workers.slots import HealthPolicy, Slot, default_cpu_threads, plan_slots
from whisperd.workers.worker import worker_main

MiB = 2**20
# A scripted card: what NVML would describe.
GPU0 = DeviceInfo(index=0, name="Scripted GPU", uuid="GPU-00000000-scripted", memory_total_bytes=16 * 2**30)
# Clock ticks of CPU time (/proc/<pid>/task/<tid>/stat) under which a thread
# is not counted as computing, whatever the others did.
_MIN_BUSY_TICKS = 5


# =========================================================================== slot planning (fast)


def test_auto_without_gpus_runs_cpu_slots() -> None:
    slots = plan_slots(WorkersConfig(devices="auto", cpu_slots=2), [])
    assert slots == [Slot(name="cpu-0", device="cpu"), Slot(name="cpu-1", device="cpu")]


def test_auto_with_gpus_runs_jobs_per_device_slots_on_every_gpu() -> None:
    slots = plan_slots(WorkersConfig(devices="auto", jobs_per_device=2, cpu_slots=3), [0, 1])
    assert [(s.name, s.device, s.gpu_index) for s in slots] == [
        ("gpu0-0", "cuda:0", 0),
        ("gpu0-1", "cuda:0", 0),
        ("gpu1-0", "cuda:1", 1),
        ("gpu1-1", "cuda:1", 1),
    ]


def test_cpu_ignores_gpus_that_are_present() -> None:
    slots = plan_slots(WorkersConfig(devices="cpu", cpu_slots=1), [0, 1])
    assert slots == [Slot(name="cpu-0", device="cpu")]


def test_a_list_of_gpus_uses_only_those() -> None:
    slots = plan_slots(WorkersConfig(devices=(1,)), [0, 1])
    assert slots == [Slot(name="gpu1-0", device="cuda:1", gpu_index=1)]


def test_listing_a_gpu_that_is_not_there_is_a_clear_error() -> None:
    with pytest.raises(WhisperdError, match=r"lists GPU 2, which NVML does not see \(GPUs found: 0, 1\)"):
        plan_slots(WorkersConfig(devices=(0, 2)), [0, 1])
    with pytest.raises(WhisperdError, match=r"GPUs found: none"):
        plan_slots(WorkersConfig(devices=(0,)), [])


def test_default_cpu_threads_share_the_usable_cores_among_the_slots() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_cpu_threads(1) == cores
    assert default_cpu_threads(2) == max(1, cores // 2)
    assert default_cpu_threads(cores * 4) == 1  # never zero threads


# =========================================================================== readings that drain (fast)


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        ("GPU is lost", "GPU is lost"),
        (idle_reading(GPU0, ecc_uncorrected=3), "uncorrectable ECC errors"),
        (
            idle_reading(GPU0, throttle_reasons=THROTTLE_HW_SLOWDOWN | THROTTLE_HW_THERMAL),
            "hw_slowdown, hw_thermal",
        ),
    ],
    ids=["lost", "ecc", "throttle"],
)
def test_a_bad_reading_drains_the_gpu_with_its_reason(tmp_path: Path, reading: Any, reason: str) -> None:
    rig = _unstarted_pool(tmp_path, ScriptedProbe(devices=[GPU0], readings={0: [reading]}))
    try:
        rig.pool.check_health(0.0)
        assert rig.pool.drained() == {0: reason}
        assert rig.of("device_health") == [{"device": "cuda:0", "healthy": False}]
        rig.pool.check_health(1.0)  # still sick: no second event
        assert len(rig.of("device_health")) == 1
    finally:
        rig.close()


def test_a_power_capped_gpu_is_not_drained(tmp_path: Path) -> None:
    # 0x04 is the software power cap: normal operation under load, not trouble.
    probe = ScriptedProbe(devices=[GPU0], readings={0: [idle_reading(GPU0, throttle_reasons=0x04)]})
    rig = _unstarted_pool(tmp_path, probe)
    try:
        rig.pool.check_health(0.0)
        assert rig.pool.drained() == {}
        assert rig.of("device_health") == []
    finally:
        rig.close()


# =========================================================================== the real daemon on the CPU


def drop_into(inbox: Path, source: Path, name: str) -> Path:
    """Drop a file the careful way: copy under a temporary name, then rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    temp = inbox / f".{name}.part"
    shutil.copyfile(source, temp)
    target = inbox / name
    os.rename(temp, target)
    return target


@pytest.fixture
def two_models(tmp_path: Path, models_dir: Path) -> Path:
    """A models folder with tiny.en twice: as `tiny.en` and as `tiny-b`."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("tiny.en", "tiny-b"):
        target = folder / f"{name}.pt"
        try:
            os.link(models_dir / "tiny.en.pt", target)
        except OSError:
            shutil.copyfile(models_dir / "tiny.en.pt", target)
    return folder


@pytest.fixture
def make_daemon(tmp_path: Path, two_models: Path) -> Iterator[Callable[..., DaemonUnderTest]]:
    """Real daemons with two inboxes: `a` uses tiny.en, `b` uses tiny-b."""
    made: list[DaemonUnderTest] = []

    def make(engine: str = "openai-whisper", **workers: Any) -> DaemonUnderTest:
        root = tmp_path / f"d{len(made)}"
        inboxes = [
            DaemonUnderTest.default_inbox(
                root, name, model=model, language="en", formats=["txt", "json"], engine=engine
            )
            for name, model in (("a", "tiny.en"), ("b", "tiny-b"))
        ]
        daemon = DaemonUnderTest(root, two_models, inboxes=inboxes, workers=workers)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


def inbox_of(daemon: DaemonUnderTest, name: str) -> Path:
    return Path(next(i["path"] for i in daemon.inboxes if i["name"] == name))


def transcribe(daemon: DaemonUnderTest, inbox: str, source: Path, name: str) -> Job:
    drop_into(inbox_of(daemon, inbox), source, name)
    job = daemon.wait_for_state(name, JobState.DONE, JobState.FAILED, timeout=180.0)
    assert job.state is JobState.DONE, f"{name}: {job.last_error}\n{daemon.log_text()}"
    return job


def assert_ran_on_cpu(job: Job) -> None:
    """The device is in the job store and in the json output's metadata."""
    assert job.device == "cpu"
    json_path = next(p for p in job.outputs if p.endswith(".json"))
    document = json.loads(Path(json_path).read_text(encoding="utf-8"))
    assert document["whisperd"]["device"] == "cpu"
    assert document["text"].strip()


def the_worker_pid(daemon: DaemonUnderTest) -> int:
    """pid of the daemon's only worker (it must not have been restarted)."""
    started = daemon.events("worker.started")
    assert len(started) == 1, daemon.log_text()
    return int(started[0]["pid"])


def scrape(daemon: DaemonUnderTest) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(daemon: DaemonUnderTest, name: str, **labels: str) -> float | None:
    return scrape(daemon).get((name, frozenset(labels.items())))


def thread_cpu_ticks(pid: int) -> dict[int, int]:
    """Thread id -> CPU time (user + system, clock ticks) of each thread of pid."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # Fields after the command name (in parentheses, may hold spaces): utime is 14, stime 15.
        fields = stat.rsplit(")", 1)[1].split()
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def computing_threads(before: dict[int, int], after: dict[int, int]) -> list[int]:
    """CPU ticks of the threads that did a real share of the work in between
    (a quarter of the busiest one's): torch's compute threads, not the
    heartbeat or the queue feeder."""
    used = sorted((after[tid] - before.get(tid, 0) for tid in after), reverse=True)
    threshold = max(_MIN_BUSY_TICKS, used[0] // 4)
    return [ticks for ticks in used if ticks >= threshold]


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cpu_budget_fitting_one_model_unloads_the_least_recently_used_one(
    make_daemon: Callable[..., DaemonUnderTest], speech: SpeechFactory
) -> None:
    daemon = make_daemon(cpu_memory_budget_mb=200, cpu_threads=1)
    daemon.start()
    clip = speech(SENTENCES[0], "sentence")

    first = transcribe(daemon, "a", clip, "first.wav")  # tiny.en
    # What tiny.en really took on the CPU is kept in the job store and is the
    # estimate next time: fp32 weights, about 145 MiB.
    measured = daemon.store.model_memory("tiny.en", "cpu")
    assert measured is not None and 100 * MiB < measured < 200 * MiB
    second = transcribe(daemon, "b", clip, "second.wav")  # tiny-b: tiny.en must go first

    events = [(e["event"], e.get("model"), e.get("reason")) for e in daemon.events()]
    unloaded = events.index(("model.unloaded", "tiny.en", "pressure"))
    loaded_b = events.index(("model.loaded", "tiny-b", None))
    assert unloaded < loaded_b, "tiny.en was unloaded only after tiny-b had been loaded"
    assert ("model.unloaded", "tiny-b", "pressure") not in events

    def counted() -> bool:
        value = metric(
            daemon, "whisperd_model_unloads_total", model="tiny.en", device="cpu", reason="pressure"
        )
        return value == 1.0

    daemon.wait_for(counted, timeout=15.0, what="whisperd_model_unloads_total{reason=pressure} == 1")
    assert metric(daemon, "whisperd_models_loaded", model="tiny.en", device="cpu") == 0.0
    assert metric(daemon, "whisperd_models_loaded", model="tiny-b", device="cpu") == 1.0

    # cpu_threads = 1: torch computes on one thread (uncapped it would use
    # every core). tiny-b is warm, so the next job is all transcription.
    pid = the_worker_pid(daemon)
    before = thread_cpu_ticks(pid)
    third = transcribe(daemon, "b", clip, "third.wav")
    busy = computing_threads(before, thread_cpu_ticks(pid))
    assert len(busy) == 1, f"threads that computed (ticks): {busy}"

    for job in (first, second, third):
        assert_ran_on_cpu(job)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_a_budget_both_models_stay_loaded_and_torch_uses_the_configured_threads(
    make_daemon: Callable[..., DaemonUnderTest], speech: SpeechFactory
) -> None:
    daemon = make_daemon(cpu_memory_budget_mb=0, cpu_threads=2)
    daemon.start()
    clip = speech(SENTENCES[0], "sentence")
    jobs = [transcribe(daemon, "a", clip, "first.wav"), transcribe(daemon, "b", clip, "second.wav")]

    assert daemon.events("model.unloaded") == []
    assert [e["model"] for e in daemon.events("model.loaded")] == ["tiny.en", "tiny-b"]
    daemon.wait_for(
        lambda: metric(daemon, "whisperd_models_loaded", model="tiny-b", device="cpu") == 1.0,
        timeout=15.0,
        what="tiny-b reported loaded",
    )
    assert metric(daemon, "whisperd_models_loaded", model="tiny.en", device="cpu") == 1.0

    # cpu_threads = 2: two threads share the transcription of a warm model.
    pid = the_worker_pid(daemon)
    before = thread_cpu_ticks(pid)
    jobs.append(transcribe(daemon, "a", clip, "third.wav"))
    busy = computing_threads(before, thread_cpu_ticks(pid))
    assert len(busy) == 2, f"threads that computed (ticks): {busy}"
    assert [e["model"] for e in daemon.events("model.loaded")] == ["tiny.en", "tiny-b"]  # no reload

    for job in jobs:
        assert_ran_on_cpu(job)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("engine", "label"),
    [("openai-whisper", "tiny.en"), ("faster-whisper", "tiny.en@faster-whisper:int8")],
)
def test_an_idle_model_is_unloaded_and_the_worker_gives_its_memory_back(
    make_daemon: Callable[..., DaemonUnderTest], speech: SpeechFactory, engine: str, label: str
) -> None:
    daemon = make_daemon(engine, model_idle_unload_seconds=2)
    daemon.start()
    clip = speech(SENTENCES[1], "sentence")
    first = transcribe(daemon, "a", clip, "first.wav")
    pid = the_worker_pid(daemon)
    with_model = vm_rss_bytes(pid)  # read at once: the model stays 2 s after its last use
    # Measured for this engine (CTranslate2's memory is outside torch's allocator).
    model_bytes = daemon.store.model_memory(label, "cpu")
    assert model_bytes is not None

    daemon.wait_for_event("model.unloaded", model=label, reason="idle", timeout=30.0)
    # At least half the model's weights leave the worker's resident memory.
    wanted = with_model - model_bytes // 2
    daemon.wait_for(
        lambda: vm_rss_bytes(pid) <= wanted,
        timeout=10.0,
        what=f"worker RSS below {wanted / MiB:.0f} MiB (was {with_model / MiB:.0f} MiB with the model)",
    )
    assert the_worker_pid(daemon) == pid  # the same process, not a restart

    # The next job loads the model again and runs as before.
    second = transcribe(daemon, "a", clip, "second.wav")
    assert [e["model"] for e in daemon.events("model.loaded")] == [label, label]
    for job in (first, second):
        assert_ran_on_cpu(job)


# =========================================================================== the pool, driven directly


class SteppedClock:
    """Monotonic time that the test can move forward at once (the pool's
    clock seam), so that "no progress for N seconds" needs no N-second wait."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@dataclass(kw_only=True)
class PoolRig:
    """A WorkerPool on a real SQLite store in tmp_path, and what it reported."""

    root: Path
    store: JobStore
    pool: WorkerPool
    clock: SteppedClock
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Job spec folders (created).
    inbox: Path = field(init=False)

    def __post_init__(self) -> None:
        self.inbox = self.root / "inbox"
        for name in ("inbox", "output", "cancel", "done", "failed"):
            (self.root / name).mkdir(exist_ok=True)

    def of(self, kind: str, *, after: int = 0) -> list[dict[str, Any]]:
        return [fields for k, fields in self.events[after:] if k == kind]

    def index_of(self, kind: str, *, after: int = 0, **match: Any) -> int | None:
        for index in range(after, len(self.events)):
            k, fields = self.events[index]
            if k == kind and all(fields.get(key) == value for key, value in match.items()):
                return index
        return None

    def restarts(self) -> list[str]:
        return [fields["reason"] for fields in self.of("worker_restarted")]

    def enqueue(self, source: Path, name: str) -> int:
        path = self.inbox / name
        shutil.copyfile(source, path)
        spec = JobSpec(
            inbox="main",
            inbox_root=str(self.inbox),
            rel_path=name,
            model="tiny.en",
            options=DecodeOptions(language="en"),
            formats=("txt", "json"),
            output_dir=str(self.root / "output"),
            cancel_dir=str(self.root / "cancel"),
            done_dir=str(self.root / "done"),
            failed_dir=str(self.root / "failed"),
        )
        job, created = self.store.enqueue(spec, FileIdentity.of(str(path)), max_attempts=3)
        assert created
        self.pool.wake()
        return job.id

    def job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def drive(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        each_pass: Callable[[], None] | None = None,
    ) -> None:
        """Run the pool's supervision, as the daemon's loop does, until predicate holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pool.supervise()
            if each_pass is not None:
                each_pass()
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: {self.events[-20:]}")

    def started_pid(self, *, after: int = 0) -> int | None:
        """pid a worker reported once it was up (its `worker_started` event)."""
        index = self.index_of("worker_started", after=after)
        return None if index is None else int(self.events[index][1]["pid"])

    def wait_worker_ready(self, *, after: int = 0) -> int:
        """Wait for a worker started after event `after` to pass its first canary; its pid."""

        def ready() -> bool:
            started = self.index_of("worker_started", after=after)
            return started is not None and self.index_of("worker_alive", after=started, ok=True) is not None

        self.drive(ready, timeout=120.0, what="a worker up and alive")
        pid = self.started_pid(after=after)
        assert pid is not None
        return pid

    def close(self) -> None:
        self.pool.stop(5.0)
        self.store.close()


# The instance the rig's workers belong to.
POOL_INSTANCE = "pool-test"


def _settings_for(root: Path, *, canary_seconds: float) -> Callable[[Slot], WorkerSettings]:
    """The daemon's own WorkerSettings for a config on a store in root, with
    short timings so that retries and health checks come quickly."""
    config = Config(
        daemon=DaemonConfig(
            database_url="sqlite:///" + str(root / "jobs.db"), log_format="json", instance=POOL_INSTANCE
        ),
        models=ModelsConfig(folder=str(root / "models"), allow_download=False),
        workers=WorkersConfig(
            cpu_threads=1,
            lease_seconds=30.0,
            heartbeat_seconds=0.5,
            retry_base_seconds=0.2,
            retry_max_seconds=1.0,
            model_idle_unload_seconds=0.0,
            cpu_memory_budget_mb=0,
            health_interval_seconds=canary_seconds,
        ),
    )
    return lambda slot: Daemon.worker_settings(config, slot, slots=1)


def _build_rig(
    root: Path,
    slots: Sequence[Slot],
    *,
    probe: ScriptedProbe | None,
    health: HealthPolicy,
    canary_seconds: float,
) -> PoolRig:
    root.mkdir(parents=True, exist_ok=True)
    store = JobStore.open("sqlite:///" + str(root / "jobs.db"))
    # The daemon registers the inboxes it watches; its workers claim only their jobs.
    store.set_instance_inboxes(POOL_INSTANCE, [("main", str(root / "inbox"))], stale_after=60.0)
    clock = SteppedClock()
    events: list[tuple[str, dict[str, Any]]] = []

    def on_event(event: WorkerEvent) -> None:
        events.append((event.kind, dataclasses.asdict(event)))

    pool = WorkerPool(
        slots,
        _settings_for(root, canary_seconds=canary_seconds),
        store,
        worker_main=worker_main,
        lifecycle=Lifecycle(store, on_event),
        cancel_grace_seconds=1.0,
        on_event=on_event,
        probe=probe,
        health=health,
        clock=clock,
    )
    return PoolRig(root=root, store=store, pool=pool, clock=clock, events=events)


def _unstarted_pool(tmp_path: Path, probe: ScriptedProbe) -> PoolRig:
    """A pool whose workers are never started: enough for device readings."""
    return _build_rig(
        tmp_path / "pool",
        [Slot(name="gpu0-0", device="cpu", gpu_index=0)],
        probe=probe,
        health=HealthPolicy(interval_seconds=1.0),
        canary_seconds=1.0,
    )


@pytest.fixture
def make_pool(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., PoolRig]]:
    rigs: list[PoolRig] = []

    def make(
        slots: Sequence[Slot],
        health: HealthPolicy,
        *,
        probe: ScriptedProbe | None = None,
        canary_seconds: float,
    ) -> PoolRig:
        root = tmp_path / "pool"
        (root / "models").mkdir(parents=True)
        os.symlink(models_dir / "tiny.en.pt", root / "models" / "tiny.en.pt")
        rig = _build_rig(root, slots, probe=probe, health=health, canary_seconds=canary_seconds)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sick_gpu_is_drained_its_job_requeued_uncounted_and_resumed_when_it_recovers(
    make_pool: Callable[..., PoolRig], speech: SpeechFactory
) -> None:
    probe = ScriptedProbe(devices=[GPU0])  # healthy until scripted otherwise
    rig = make_pool(
        [Slot(name="gpu0-0", device="cpu", gpu_index=0)],
        HealthPolicy(interval_seconds=1.0),
        probe=probe,
        canary_seconds=1.0,
    )
    long_id = rig.enqueue(speech(" ".join(SENTENCES[:3]), "long"), "long.wav")
    rig.pool.start()
    rig.drive(lambda: bool(rig.of("model_loaded")), timeout=120.0, what="long.wav being transcribed")
    # Held mid-job (as in the hung-job test): on a fast or an idle machine the
    # job could otherwise end before the next health check reads the GPU lost.
    # The drain SIGKILLs the worker whatever it is doing.
    running_pid = rig.started_pid()
    assert running_pid is not None
    os.kill(running_pid, signal.SIGSTOP)
    assert rig.job(long_id).state is JobState.RUNNING

    # The GPU falls off the bus: its running job goes back to the queue, uncounted.
    probe.script(0, "GPU is lost")
    rig.drive(lambda: bool(rig.of("device_health")), timeout=15.0, what="the GPU marked unhealthy")
    assert rig.of("device_health") == [{"device": "cuda:0", "healthy": False}]
    assert rig.pool.drained() == {0: "GPU is lost"}
    released = rig.job(long_id)
    assert released.state is JobState.QUEUED
    assert released.attempts == 0
    assert "cuda:0 unhealthy: GPU is lost" in (released.last_error or "")
    assert rig.restarts() == ["unhealthy"]

    # While the GPU is out, nothing is claimed, even by a fresh worker rung for new work.
    mark = len(rig.events)
    short_id = rig.enqueue(speech(SENTENCES[3], "short"), "short.wav")
    rig.wait_worker_ready(after=mark)
    probe.script(0, idle_reading(GPU0, ecc_uncorrected=1))  # answering again, but still sick
    rig.pool.wake()
    # Two health checks read the sick GPU after the wake, and the idle worker
    # passed a canary after it: every chance to claim came and went.
    reads, woken = probe.reads(0), len(rig.events)
    rig.drive(
        lambda: probe.reads(0) >= reads + 2 and bool(rig.of("worker_alive", after=woken)),
        timeout=60.0,
        what="two more health checks of the sick GPU and a canary",
    )
    for job_id in (long_id, short_id):
        job = rig.job(job_id)
        assert (job.state, job.attempts) == (JobState.QUEUED, 0), job
    assert len(rig.of("device_health")) == 1
    assert rig.pool.busy() == {"gpu0-0": 0}

    # Healthy again: the slot resumes and both jobs run to the end.
    probe.script(0, idle_reading(GPU0))

    def both_ended() -> bool:
        return all(rig.job(j).state not in (JobState.QUEUED, JobState.RUNNING) for j in (long_id, short_id))

    rig.drive(both_ended, timeout=240.0, what="both jobs finished after the GPU recovered")
    assert rig.of("device_health") == [
        {"device": "cuda:0", "healthy": False},
        {"device": "cuda:0", "healthy": True},
    ]
    assert rig.pool.drained() == {}
    for job_id in (long_id, short_id):
        job = rig.job(job_id)
        assert (job.state, job.attempts) == (JobState.DONE, 1), job
        assert {Path(p).suffix for p in job.outputs} == {".txt", ".json"}
    assert rig.restarts() == ["unhealthy"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_silent_idle_worker_is_killed_and_replaced(make_pool: Callable[..., PoolRig]) -> None:
    health = HealthPolicy(interval_seconds=0.5)
    rig = make_pool([Slot(name="cpu-0", device="cpu")], health, canary_seconds=0.5)
    rig.pool.start()
    pid = rig.wait_worker_ready()

    # An idle worker that answers its canaries is left alone past the silence
    # limit: canaries, one per interval, until more than the limit has passed.
    ready = len(rig.events)
    canaries = int((health.silent_worker_seconds + 2.0) / health.interval_seconds) + 1
    rig.drive(
        lambda: len(rig.of("worker_alive", after=ready)) >= canaries,
        timeout=120.0,
        what=f"{canaries} canaries from the idle worker",
    )
    assert rig.restarts() == []

    mark = len(rig.events)
    os.kill(pid, signal.SIGSTOP)
    rig.drive(lambda: bool(rig.restarts()), timeout=60.0, what="the stopped worker replaced")
    # Caught by its missing liveness beat or its missing canary: either way "silent".
    assert rig.restarts() == ["silent"]
    # Replaced for its silence: at most a canary already on its way when it
    # stopped reached the pool before the restart.
    restarted = rig.index_of("worker_restarted", after=mark)
    assert restarted is not None
    answered = [kind for kind, _ in rig.events[mark:restarted] if kind == "worker_alive"]
    assert len(answered) <= 1, rig.events[mark:]
    assert process_gone(pid)

    fresh = rig.wait_worker_ready(after=mark)
    assert fresh != pid
    assert rig.pool.alive_count() == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_job_is_killed_retried_and_done_by_a_fresh_worker(
    make_pool: Callable[..., PoolRig], speech: SpeechFactory
) -> None:
    # Health checks are stepped by the test (the scheduled ones are an hour
    # apart). Hung: no progress for max(2 s, 1.0 x the audio's length).
    health = HealthPolicy(interval_seconds=3600.0, hung_min_seconds=2.0, hung_audio_factor=1.0)
    rig = make_pool([Slot(name="cpu-0", device="cpu")], health, canary_seconds=1.0)
    job_id = rig.enqueue(speech(" ".join(SENTENCES[:3]), "long"), "long.wav")
    rig.pool.start()
    rig.drive(lambda: bool(rig.of("model_loaded")), timeout=120.0, what="long.wav being transcribed")
    pid = rig.started_pid()
    assert pid is not None and rig.job(job_id).state is JobState.RUNNING

    os.kill(pid, signal.SIGSTOP)
    rig.pool.check_health(rig.clock())  # the pool notes the progress it sees
    rig.clock.jump(120.0)  # ... which then does not move for two minutes
    rig.pool.check_health(rig.clock())
    assert rig.restarts() == ["hung"]
    assert process_gone(pid)
    retried = rig.job(job_id)
    assert (retried.state, retried.attempts) == (JobState.QUEUED, 1)
    assert (retried.last_error or "").startswith("hung: no progress for 120 s")

    # The fresh worker takes the job again, and a health check right then
    # must judge the new attempt by its own progress, not the old one's.
    rig.drive(
        lambda: rig.job(job_id).attempts == 2, timeout=120.0, what="the job claimed again by the fresh worker"
    )
    # Finished means ended and its source moved: the worker moves the file
    # just after it records the end.
    rig.drive(
        lambda: rig.job(job_id).disposed_at is not None,
        timeout=180.0,
        what="the retried job finished and its source moved",
        each_pass=lambda: rig.pool.check_health(rig.clock()),
    )
    done = rig.job(job_id)
    assert (done.state, done.attempts) == (JobState.DONE, 2), done
    assert rig.restarts() == ["hung"]
    assert (rig.root / "done" / "long.wav").is_file()
