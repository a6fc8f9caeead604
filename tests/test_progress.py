"""Live progress on the real daemon: the job store's progress and ETA while a
long clip is transcribed, the progress bar of `whisperd status`, and the
durations and realtime factors of `whisperd jobs`."""

from __future__ import annotations

import re
import wave
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_harness import DaemonUnderTest

from whisperd.jobs import JobState

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
    assert all(0.0 <= p < 1.0 for p in progress), progress
    moving = sorted({p for p in progress if p > 0})
    assert len(moving) >= 2, f"progress seen only at {moving}"
    assert all(eta is not None and eta >= 0 for p, eta in samples if p > 0), samples
    assert done.progress == 1.0 and done.eta_seconds == 0.0

    # `whisperd status`: the queue line, then the running job with a bar,
    # its percentage, elapsed time, ETA, device and file.
    assert status, "never saw the job running with progress"
    assert status[0].startswith("queue: "), status[0]
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
