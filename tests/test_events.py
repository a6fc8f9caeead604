"""Typed worker events (events.py): they cross the process boundary whole,
the lifecycle's (kind, fields) become them, and the metrics sink records each
exactly as the daemon's string-keyed table did (same series, same values)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from whisperd import events
from whisperd.events import WorkerEvent
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobSpec
from whisperd.lifecycle import Lifecycle
from whisperd.metrics.registry import Metrics
from whisperd.store.job_store import JobStore
from whisperd.workers.channel import Doorbell, Flag, SlotChannel, put_event

EVERY_EVENT: list[WorkerEvent] = [
    events.WorkerStarted(worker="host/cpu-0", device="cpu", pid=4242),
    events.WorkerAlive(worker="host/cpu-0", ok=False, error="canary: CUDA error"),
    events.JobStarted(inbox="talks", device="cuda:0", queue_wait_seconds=12.5),
    events.JobFinished(
        job_id=7, inbox="talks", outcome="done", device="cuda:0", duration_seconds=30.0, audio_seconds=60.0
    ),
    events.JobRetried(inbox="talks"),
    events.JobRejected(inbox="talks", reason="too_long"),
    events.JobCancelSeen(job_id=7),
    events.ModelLoaded(model="tiny.en", device="cuda:0", seconds=2.5),
    events.ModelUnloaded(model="tiny.en", device="cuda:0", reason="idle"),
    events.ModelsLoaded(device="cuda:0", models=("base", "small@faster-whisper:int8")),
    events.CpuFallback(model="large-v3"),
    events.WorkerRestarted(slot="gpu0-0", reason="hung"),
    events.DeviceHealth(device="cuda:0", healthy=False),
]


def test_every_event_kind_is_named_once_and_pickles_whole() -> None:
    kinds = [event.kind for event in EVERY_EVENT]
    assert len(set(kinds)) == len(kinds)
    for event in EVERY_EVENT:
        assert pickle.loads(pickle.dumps(event)) == event
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, "device", "elsewhere")  # noqa: B010 - any field, whichever event


def test_a_worker_puts_typed_events_on_its_channel_for_the_pool() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    channel = SlotChannel(
        paused=Flag(ctx),
        stop=Flag(ctx),
        wake=Doorbell(ctx),
        current_job=ctx.Value("q", 0, lock=False),
        cancel_job=ctx.Value("q", 0, lock=False),
        switch_lock=ctx.Lock(),
        events=queue,
    )
    for event in EVERY_EVENT:
        put_event(channel, event)
    assert [queue.get(timeout=10) for _ in EVERY_EVENT] == EVERY_EVENT
    queue.close()
    channel.wake.close()


def test_a_closed_channel_never_breaks_the_job() -> None:
    class Gone:
        def put_nowait(self, _event: object) -> None:
            raise OSError("the pool is gone")

    channel = SlotChannel(
        paused=None, stop=None, wake=None, current_job=None, cancel_job=None, switch_lock=None, events=Gone()
    )
    put_event(channel, events.JobRetried(inbox="talks"))  # does not raise


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    opened = JobStore.open("sqlite:///" + str(tmp_path / "jobs.db"))
    yield opened
    opened.close()


def test_what_the_lifecycle_reports_arrives_typed(tmp_path: Path, store: JobStore) -> None:
    folders = {name: tmp_path / name for name in ("inbox", "output", "done", "failed", "cancel")}
    for folder in folders.values():
        folder.mkdir()
    source = folders["inbox"] / "talk.wav"
    source.write_bytes(b"RIFF talk")
    spec = JobSpec(
        inbox="talks",
        inbox_root=str(folders["inbox"]),
        rel_path="talk.wav",
        model="tiny.en",
        output_dir=str(folders["output"]),
        done_dir=str(folders["done"]),
        failed_dir=str(folders["failed"]),
        cancel_dir=str(folders["cancel"]),
    )
    job, _ = store.enqueue(spec, FileIdentity.of(str(source)), max_attempts=3)
    seen: list[WorkerEvent] = []
    life = Lifecycle(store, seen.append)
    claim = store.claim(worker="host/cpu-0", device="cpu", lease_seconds=30.0)
    assert claim is not None
    retry = AttemptEnd(outcome=AttemptOutcome.RETRY, error="boom", retry_base_seconds=0, retry_max_seconds=0)
    life.end_attempt(claim.job, claim.token, retry, device="cpu", duration_seconds=1.5)
    assert seen == [
        events.JobRetried(inbox="talks"),
        events.JobFinished(
            job_id=job.id,
            inbox="talks",
            outcome="retry",
            device="cpu",
            duration_seconds=1.5,
            audio_seconds=None,
        ),
    ]


def _exposition(record: Callable[[Metrics], None]) -> list[str]:
    metrics = Metrics(
        job_counts=lambda: {}, running_jobs=lambda: [], devices=None, version="test", process_collector=False
    )
    record(metrics)
    # Every line but the `_created` series (the moment each series was made).
    lines = generate_latest(metrics.registry).decode().splitlines()
    return [line for line in lines if "_created" not in line]


def test_the_metrics_sink_records_each_event_as_the_daemon_did() -> None:
    def by_hooks(m: Metrics) -> None:
        m.job_started("talks", "cuda:0", 12.5)
        m.job_finished("talks", "done", device="cuda:0", duration_seconds=30.0, audio_seconds=60.0)
        m.job_retried("talks")
        m.job_rejected("talks", "too_long")
        m.model_loaded("tiny.en", "cuda:0", 2.5)
        m.model_unloaded("tiny.en", "cuda:0", "idle")
        m.set_models_loaded("cuda:0", ["base", "small@faster-whisper:int8"])
        m.cpu_fallback("large-v3")
        m.worker_restarted("gpu0-0", "hung")
        m.device_health_changed("cuda:0", False)

    def by_events(m: Metrics) -> None:
        sink = m.sink  # what the daemon hands every event to
        for event in EVERY_EVENT:
            sink.handle(event)

    expected = _exposition(by_hooks)
    assert 'whisperd_jobs_finished_total{inbox="talks",outcome="done"} 1.0' in expected
    assert _exposition(by_events) == expected
