"""Live progress on the real daemon: the job store's progress and ETA while a
long clip is transcribed, the progress bar of `whisperd status`, and the
durations and realtime factors of `whisperd jobs`."""

from __future__ import annotations

import json
import re
import urllib.request
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState
from whisperd.store.schema import JOBS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DaemonFactory = Callable[..., DaemonUnderTest]


def test_progress_rises_with_an_eta_and_status_and_jobs_show_it(
    daemon_factory: DaemonFactory, long_clip: Path
) -> None:
    daemon = daemon_factory(daemon={"log_level": "info"})
    daemon.start()
    daemon.drop(long_clip)

    # Sample the job store while the job runs; ask `whisperd status` once
    # there is progress to show.
    samples: list[tuple[float, float | None]] = []
    status: list[str] = []

    def finished() -> bool:
        job = daemon.job_for("long.wav")
        if job is None or job.state is JobState.QUEUED:
            return False
        if job.state is JobState.RUNNING:
            samples.append((job.progress, job.eta_seconds))
            if job.progress > 0 and not status:
                status.append(daemon.cli("status").stdout)
            return False
        assert job.state is JobState.DONE, f"long.wav ended {job.state.value}: {job.last_error}"
        return True

    daemon.wait_for(finished, timeout=240.0, what="long.wav done")
    done = daemon.job_for("long.wav")
    assert done is not None

    progress = [p for p, _ in samples]
    assert progress == sorted(progress), "progress went backwards"
    # The engine reports 1.0 as soon as decoding ends; the job stays running
    # while its outputs are written, so 100% may be seen just before done.
    assert all(0.0 <= p <= 1.0 for p in progress), progress
    moving = sorted({p for p in progress if p > 0})
    assert len(moving) >= 2, f"progress seen only at {moving}"
    assert any(0.0 < p < 1.0 for p in progress), f"no progress between 0 and 1: {moving}"
    assert all(eta is not None and eta >= 0 for p, eta in samples if p > 0), samples
    assert done.progress == 1.0 and done.eta_seconds == 0.0

    # `whisperd status`: the daemons on the store, the queue line, then the
    # running job with a bar, its percentage, elapsed time, ETA, device and file.
    assert status, "never saw the job running with progress"
    lines = status[0].splitlines()
    assert lines[0] == "instances: 1 (1 live)", status[0]
    assert any(line.startswith("queue: ") for line in lines), status[0]
    bar = re.compile(
        rf"#{done.id}\s+\[#*-*\]\s+\d+\.\d%\s+elapsed \d+:\d\d\s+eta \d+:\d\d\s+cpu\s+main/long\.wav"
    )
    assert any(bar.search(line) for line in status[0].splitlines()), status[0]

    # `whisperd jobs`: the finished job with how long it took and its
    # realtime factor (seconds of work per second of audio).
    listing = daemon.cli("jobs")
    assert listing.returncode == 0, listing
    line = next(row for row in listing.stdout.splitlines() if row.rstrip().endswith("main/long.wav"))
    match = re.search(r"\bdone\s+1/\d+\s+(\d+\.\d)s\s+(\d+\.\d\d)\s+cpu\b", line)
    assert match, line
    assert done.started_at is not None and done.finished_at is not None and done.audio_seconds
    took = done.finished_at - done.started_at
    assert float(match.group(1)) == pytest.approx(took, abs=0.051)
    assert float(match.group(2)) == pytest.approx(took / done.audio_seconds, abs=0.0051)
    with wave.open(str(long_clip)) as clip:
        assert done.audio_seconds == pytest.approx(clip.getnframes() / clip.getframerate(), abs=0.1)


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _row(engine: sa.Engine, rel_path: str) -> Any:
    """The job's row as the worker last wrote it, with when it wrote it."""
    columns = [JOBS.c[name] for name in ("id", "state", "progress", "eta_seconds", "updated_at")]
    columns += [JOBS.c.started_at, JOBS.c.decoding_started_at, JOBS.c.audio_seconds]
    with engine.connect() as conn:
        return conn.execute(sa.select(*columns).where(JOBS.c.rel_path == rel_path)).first()


def test_a_clip_shorter_than_one_window_shows_progress_and_an_eta_from_its_own_decoding_rate(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    # Two sentences: about 20 s, less than whisper's 30-s window, which
    # used to be the only step progress took (0 % until done).
    clip = speech(" ".join(SENTENCES[:2]), "twenty")
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(clip)
    engine = sa.create_engine(daemon.database_url)
    port = daemon.metrics_port
    samples: list[Any] = []
    etas: list[float] = []

    def finished() -> bool:
        row = _row(engine, "twenty.wav")
        if row is None or row.state == JobState.QUEUED.value:
            return False
        if row.state == JobState.RUNNING.value:
            samples.append(row)
            eta = _scrape(port).get(
                ("whisperd_running_job_eta_seconds", frozenset({"inbox": "main", "device": "cpu"}.items()))
            )
            if eta is not None:
                etas.append(eta)
            return False
        assert row.state == JobState.DONE.value, row
        return True

    try:
        daemon.wait_for(finished, timeout=240.0, what="twenty.wav done")
        done = _row(engine, "twenty.wav")
    finally:
        engine.dispose()
    assert 0 < done.audio_seconds < 30, done

    progress = [row.progress for row in samples]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    between = [row for row in samples if 0.0 < row.progress < 1.0]
    assert between, f"no progress strictly between 0 and 1 before done: {progress}"

    # The ETA is the decoding time so far per fraction done, times the
    # fraction left, as of the beat that wrote it: counted from when the
    # engine began (model loaded, audio read), not from the claim.
    for row in between:
        assert row.decoding_started_at is not None and row.decoding_started_at > row.started_at, row
        decoding = row.updated_at - row.decoding_started_at
        assert row.eta_seconds == pytest.approx(
            decoding * (1 - row.progress) / row.progress, rel=0.02, abs=0.05
        )

    # The metrics show the ETA while the job runs, and the worker's memory:
    # a process that loaded torch and a model holds far more than nothing.
    assert etas and all(eta >= 0 for eta in etas), etas
    rss = _scrape(port).get(("whisperd_worker_rss_bytes", frozenset({"slot": "cpu-0"}.items())))
    assert rss is not None and rss > 50 * 2**20, rss

    # `whisperd show`: the engine's own time and speed of the done job.
    document = json.loads(daemon.cli("show", str(done.id), "--json").stdout)["job"]
    assert document["decoding_seconds"] > 0 and document["decoding_started_at"] == done.decoding_started_at
    assert document["decoding_realtime_factor"] == pytest.approx(
        document["decoding_seconds"] / document["audio_seconds"]
    )
    assert document["decoding_seconds"] < done.updated_at - done.started_at  # the model load is not in it
    text = daemon.cli("show", str(done.id)).stdout
    assert re.search(r"decoding .*\(\d+\.\ds, \d+\.\d\d s per audio second\)", text), text
