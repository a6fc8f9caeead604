"""Nothing lost, nothing twice: the real daemon killed at every point of a job.

Each test runs `whisperd run` in a subprocess, kills it (or its worker) with
SIGKILL at a chosen moment, starts it again, and checks what a user would
see: one done job per file, complete outputs, the source in done/ once.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import srt
import webvtt

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

FORMATS = ("txt", "srt", "vtt", "json", "tsv")
DaemonFactory = Callable[..., DaemonUnderTest]


# --------------------------------------------------------------------------- helpers


def wait_for_exit(daemon: DaemonUnderTest, timeout: float = 120.0) -> int:
    """Wait for the daemon to die on its own (the crash hook kills it)."""
    assert daemon.process is not None
    code = daemon.process.wait(timeout)
    if daemon._reader is not None:
        daemon._reader.join(10)
    return code


def jobs_for(daemon: DaemonUnderTest, rel_path: str) -> list[Job]:
    return [job for job in daemon.jobs() if job.spec.rel_path == rel_path]


def wait_disposed(daemon: DaemonUnderTest, rel_path: str, *states: JobState) -> Job:
    """The job once it has ended in one of `states` and its source was moved."""

    def disposed() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and job.state in states and job.disposed_at is not None

    daemon.wait_for(disposed, timeout=180.0, what=f"{rel_path} {[s.value for s in states]} and moved")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if TMP_MARKER in p.name)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def assert_outputs_complete(job: Job, output: Path) -> None:
    """Every format written once, whole and parseable, and nothing else."""
    paths = [Path(p) for p in job.outputs]
    assert sorted(p.suffix.lstrip(".") for p in paths) == sorted(FORMATS)
    assert sorted(str(p.relative_to(output)) for p in paths) == files_in(output)
    by_format = {p.suffix.lstrip("."): p for p in paths}
    assert by_format["txt"].read_text(encoding="utf-8").strip()
    assert list(srt.parse(by_format["srt"].read_text(encoding="utf-8")))
    assert webvtt.read(str(by_format["vtt"])).captions
    document: dict[str, Any] = json.loads(by_format["json"].read_text(encoding="utf-8"))
    assert document["text"].strip() and document["whisperd"]["job_id"] == job.id
    rows = by_format["tsv"].read_text(encoding="utf-8").splitlines()
    assert rows[0] == "start\tend\ttext" and len(rows) > 1


def assert_transcribed_once(daemon: DaemonUnderTest, name: str, *, attempts: int) -> Job:
    """One done job for `name`, complete outputs, its source in done/ once."""
    jobs = jobs_for(daemon, name)
    assert [j.state for j in jobs] == [JobState.DONE], daemon.log_text()
    job = jobs[0]
    assert job.attempts == attempts, f"attempts {job.attempts}: {job.last_error}"
    assert_outputs_complete(job, daemon.output)
    assert files_in(daemon.done) == [name]
    assert job.disposed_to == str(daemon.done / name)
    assert not (daemon.inbox / name).exists()
    assert temp_files(daemon.root) == []
    return job


def worker_pid(daemon: DaemonUnderTest) -> int:
    """pid of the newest worker the daemon started (its `worker.started` log line)."""
    started = daemon.events("worker.started")
    assert started, daemon.log_text()
    pid = int(started[-1]["pid"])
    assert daemon.process is not None
    assert _parent_of(pid) == daemon.process.pid, "the logged worker is not the daemon's child"
    return pid


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
        # Field 4 is the parent pid; field 2 (the name) may hold spaces, so split after it.
        return int(stat.read().rsplit(")", 1)[1].split()[1])


# --------------------------------------------------------------------------- crash points

# Where the crash hook fires, and the attempts the job has once done: a crash
# while the job ran costs an attempt; one after it was marked done does not
# (the lifecycle's steps: just marked done, and its source already moved).
CRASH_CASES = [
    ("after_claim", 2),
    ("during_transcription", 2),
    ("after_outputs", 2),
    ("after_transition", 1),
    ("after_source_moved", 1),
]
ENDED_POINTS = ("after_transition", "after_source_moved")


@pytest.mark.parametrize(("point", "attempts"), CRASH_CASES)
def test_daemon_killed_at_crash_point_transcribes_file_exactly_once(
    daemon_database_url: str | None,
    daemon_factory: DaemonFactory,
    speech: SpeechFactory,
    point: str,
    attempts: int,
) -> None:
    daemon = daemon_factory(database_url=daemon_database_url)
    clip = speech(SENTENCES[0], "talk")
    daemon.start(crash_point=point)
    daemon.drop(clip)

    assert wait_for_exit(daemon) == -signal.SIGKILL, daemon.log_text()
    crashed = daemon.job_for("talk.wav")
    assert crashed is not None and crashed.attempts == 1
    expected_state = JobState.DONE if point in ENDED_POINTS else JobState.RUNNING
    assert crashed.state is expected_state

    daemon.start()
    wait_disposed(daemon, "talk.wav", JobState.DONE, JobState.FAILED)
    job = assert_transcribed_once(daemon, "talk.wav", attempts=attempts)
    if point in ENDED_POINTS:
        # The restart only completed the move: nothing ran again.
        assert daemon.events("job.claimed") == []
    else:
        assert daemon.events("job.recovered")[0]["job_id"] == job.id
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- worker kills


@pytest.mark.parametrize("engine", ["openai-whisper", "faster-whisper"])
def test_killed_worker_is_replaced_and_its_job_retried(
    daemon_factory: DaemonFactory, speech: SpeechFactory, long_clip: Path, engine: str
) -> None:
    daemon = daemon_factory(inbox={"engine": engine})
    # faster-whisper finishes a short clip in about a second: give it one
    # long enough to be killed in the middle of.
    clip = long_clip if engine == "faster-whisper" else speech(SENTENCES[1], "meeting")
    daemon.start()
    first_worker = worker_pid(daemon)
    daemon.drop(clip, "meeting.wav")
    daemon.wait_for_state("meeting.wav", JobState.RUNNING)

    os.kill(first_worker, signal.SIGKILL)

    exited = daemon.wait_for_event("worker.exited")
    assert exited["exit_code"] == -signal.SIGKILL
    daemon.wait_for(lambda: len(daemon.events("worker.started")) == 2, what="a new worker")
    assert worker_pid(daemon) != first_worker
    wait_disposed(daemon, "meeting.wav", JobState.DONE, JobState.FAILED)
    assert_transcribed_once(daemon, "meeting.wav", attempts=2)
    retried = daemon.wait_for_event("job.retry", file="meeting.wav")
    assert "worker process died" in retried["error"]
    assert daemon.process is not None and daemon.process.poll() is None
    assert daemon.stop() == 0


def test_file_that_kills_its_worker_every_time_ends_failed_while_others_finish(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(workers={"max_attempts": 2})
    poison = speech(SENTENCES[2], "poison")
    healthy = speech(SENTENCES[3], "healthy")
    daemon.start()
    daemon.drop(poison)
    daemon.wait_for_state("poison.wav", JobState.QUEUED, JobState.RUNNING)
    daemon.drop(healthy)  # queued behind the poison file
    kills: list[int] = []

    def kill_worker_running_poison() -> bool:
        """Kill the worker each time it claims the poison job (one kill per attempt)."""
        job = daemon.job_for("poison.wav")
        if job is not None and job.state is JobState.RUNNING and job.attempts > len(kills):
            pid = worker_pid(daemon)
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
        return job is not None and job.state is JobState.FAILED

    daemon.wait_for(kill_worker_running_poison, timeout=180.0, what="poison.wav failed")

    failed = wait_disposed(daemon, "poison.wav", JobState.FAILED)
    assert len(kills) == 2 and len(set(kills)) == 2
    assert failed.attempts == 2
    assert failed.last_error is not None and "worker process died" in failed.last_error
    assert (daemon.failed / "poison.wav").exists() and not (daemon.inbox / "poison.wav").exists()
    note = (daemon.failed / "poison.wav.error.txt").read_text(encoding="utf-8")
    assert "worker process died" in note and "2 of 2" in note
    assert [name for name in files_in(daemon.output) if name.startswith("poison")] == []

    wait_disposed(daemon, "healthy.wav", JobState.DONE, JobState.FAILED)
    healthy_job = jobs_for(daemon, "healthy.wav")
    assert [j.state for j in healthy_job] == [JobState.DONE]
    assert healthy_job[0].attempts == 1
    assert (daemon.done / "healthy.wav").exists()
    assert len(daemon.events("worker.exited")) == 2
    assert daemon.stop() == 0
