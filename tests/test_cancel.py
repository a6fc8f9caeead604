"""Cancelling jobs on the real daemon: by moving (or copying) a file into the
cancel folder and with `whisperd cancel ID|PATH`, for queued and running jobs.

Every test runs `whisperd run` in a subprocess with the real tiny.en model on
real espeak-ng speech. The long clip (the SENTENCES three times, about 130 s
of speech) keeps a worker busy long enough to cancel it mid-transcription.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SENTENCES, SpeechFactory
from daemon_harness import DaemonUnderTest

from whisperd.jobs import OUTPUT_FORMATS, Job, JobState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DaemonFactory = Callable[..., DaemonUnderTest]

# How long a cancel may take to show in the job store (generous: the machine is shared).
CANCEL_SECONDS = 15.0


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 130 s of speech (the SENTENCES spoken three times), made once per module."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    clip = tmp_path_factory.mktemp("long-clip") / "long.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(clip), "--stdin"],
        input=" ".join(SENTENCES * 3).encode("utf-8"),
        check=True,
        capture_output=True,
    )
    return clip


# --------------------------------------------------------------------------- helpers


def wait_until_transcribing(daemon: DaemonUnderTest, rel_path: str) -> Job:
    """Wait until the job runs and has reported progress (the model is loaded
    and decoding), so a cancel lands in the middle of the transcription."""

    def transcribing() -> bool:
        job = daemon.job_for(rel_path)
        if job is not None and not job.state.is_active:
            raise AssertionError(f"{rel_path} ended {job.state.value} ({job.last_error}) before it could be cancelled")
        return job is not None and job.state is JobState.RUNNING and job.progress > 0

    daemon.wait_for(transcribing, timeout=120.0, what=f"{rel_path} transcribing")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def outputs_named(daemon: DaemonUnderTest, stem: str) -> list[str]:
    """Files in the output folder belonging to `stem`, temp files included."""
    return sorted(
        name
        for name in os.listdir(daemon.output)
        if name.startswith(f"{stem}.") or name.startswith(f".{stem}.")
    )


def worker_pids(daemon: DaemonUnderTest) -> dict[str, int]:
    """Slot name -> pid of the newest worker process the pool started for it."""
    return {event["slot"]: int(event["pid"]) for event in daemon.events("worker.started")}


def slot_of(job: Job) -> str:
    assert job.worker is not None
    return job.worker.rsplit("/", 1)[1]


def process_running(pid: int) -> bool:
    """True if pid is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def move_to_cancel(daemon: DaemonUnderTest, name: str) -> None:
    os.rename(daemon.inbox / name, daemon.cancel / name)


def assert_complete_outputs(daemon: DaemonUnderTest, stem: str) -> None:
    """Every format written whole: no temp files, and the json parses."""
    assert outputs_named(daemon, stem) == sorted(f"{stem}.{fmt}" for fmt in OUTPUT_FORMATS)
    for fmt in OUTPUT_FORMATS:
        assert (daemon.output / f"{stem}.{fmt}").stat().st_size > 0, fmt
    data = json.loads((daemon.output / f"{stem}.json").read_text(encoding="utf-8"))
    txt = (daemon.output / f"{stem}.txt").read_text(encoding="utf-8")
    assert data["text"].split() == txt.split()  # the txt has one line per segment


def assert_cancelled_cleanly(daemon: DaemonUnderTest, rel_path: str) -> Job:
    job = daemon.wait_for_state(rel_path, JobState.CANCELLED, JobState.DONE, timeout=CANCEL_SECONDS)
    assert job.state is JobState.CANCELLED, f"{rel_path} ended {job.state.value}:\n{daemon.log_text()}"
    assert outputs_named(daemon, Path(rel_path).stem) == []
    return job


# --------------------------------------------------------------------------- queued jobs


def test_cancelled_queued_job_is_never_claimed_and_moving_it_back_runs_it_again(
    daemon_factory: DaemonFactory, long_clip: Path, speech: SpeechFactory
) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(long_clip)
    wait_until_transcribing(daemon, "long.wav")
    daemon.drop(speech(SENTENCES[0], "second"))
    daemon.wait_for_state("second.wav", JobState.QUEUED, timeout=30)

    move_to_cancel(daemon, "second.wav")

    job = daemon.wait_for_state("second.wav", JobState.CANCELLED, timeout=CANCEL_SECONDS)
    assert job.attempts == 0 and job.started_at is None
    assert daemon.events("job.claimed") and all(
        e["file"] != "second.wav" for e in daemon.events("job.claimed")
    )
    assert outputs_named(daemon, "second") == []
    assert (daemon.cancel / "second.wav").is_file()
    assert not (daemon.inbox / "second.wav").exists()
    daemon.wait_for_event("job.cancelled", file="second.wav", phase="queued")

    # The long job is not our subject: stop it so that the worker is free.
    move_to_cancel(daemon, "long.wav")
    assert_cancelled_cleanly(daemon, "long.wav")

    # Moving the file back from cancel/ is a new drop: a new job that ends done.
    os.rename(daemon.cancel / "second.wav", daemon.inbox / "second.wav")
    daemon.wait_for(
        lambda: any(j.id != job.id and j.state is JobState.DONE for j in daemon.jobs() if j.spec.rel_path == "second.wav"),
        timeout=120.0,
        what="a new job for second.wav ending done",
    )
    assert daemon.job_for("second.wav") is not None
    assert_complete_outputs(daemon, "second")
    assert (daemon.done / "second.wav").is_file()
    assert daemon.store.get(job.id).state is JobState.CANCELLED  # type: ignore[union-attr]


# --------------------------------------------------------------------------- running jobs


def test_moving_a_running_job_into_cancel_stops_it_and_the_next_job_runs(
    daemon_factory: DaemonFactory, long_clip: Path, speech: SpeechFactory
) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(long_clip)
    running = wait_until_transcribing(daemon, "long.wav")
    pid = worker_pids(daemon)[slot_of(running)]

    asked = time.monotonic()
    move_to_cancel(daemon, "long.wav")

    job = assert_cancelled_cleanly(daemon, "long.wav")
    took = time.monotonic() - asked
    assert job.progress < 1.0
    assert (daemon.cancel / "long.wav").is_file()
    # The worker that ran it either stopped the job itself and is idle again,
    # or overran the grace period and was killed and replaced.
    daemon.wait_for(
        lambda: bool(daemon.events("worker.killed"))
        or any("seconds" in e for e in daemon.events("job.cancelled") if e["job_id"] == job.id),
        timeout=10.0,
        what="the cancelled job's worker to stop or be killed",
    )
    if daemon.events("worker.killed"):
        daemon.wait_for(lambda: not process_running(pid), timeout=10.0, what=f"worker {pid} gone")
        assert worker_pids(daemon)[slot_of(running)] != pid
    else:
        assert process_running(pid) and worker_pids(daemon)[slot_of(running)] == pid

    daemon.drop(speech(SENTENCES[1], "next"))
    daemon.wait_for_state("next.wav", JobState.DONE, timeout=120.0)
    assert_complete_outputs(daemon, "next")
    assert outputs_named(daemon, "long") == []
    assert took < CANCEL_SECONDS


def test_copying_a_running_jobs_file_into_cancel_stops_it(
    daemon_factory: DaemonFactory, long_clip: Path
) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(long_clip)
    wait_until_transcribing(daemon, "long.wav")

    shutil.copyfile(daemon.inbox / "long.wav", daemon.cancel / "long.wav")  # a plain copy: new inode, new mtime

    assert_cancelled_cleanly(daemon, "long.wav")
    assert (daemon.cancel / "long.wav").is_file()
    # The original follows the copy into cancel/, under a name of its own.
    daemon.wait_for(
        lambda: not (daemon.inbox / "long.wav").exists() and (daemon.cancel / "long (2).wav").is_file(),
        timeout=30.0,
        what="the original long.wav moved into cancel/",
    )


def test_cancelling_a_finished_job_changes_nothing_and_says_so(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(speech(SENTENCES[2], "finished"))
    done = daemon.wait_for_state("finished.wav", JobState.DONE, timeout=120.0)
    daemon.wait_for(lambda: (daemon.done / "finished.wav").is_file(), timeout=30.0, what="source in done/")

    os.rename(daemon.done / "finished.wav", daemon.cancel / "finished.wav")

    event = daemon.wait_for_event("cancel.no_active_job", timeout=30.0, file="finished.wav")
    assert event["inbox"] == "main"
    after = daemon.store.get(done.id)
    assert after is not None and after.state is JobState.DONE and not after.cancel_requested
    assert_complete_outputs(daemon, "finished")
    assert (daemon.cancel / "finished.wav").is_file()


# --------------------------------------------------------------------------- whisperd cancel


def test_whisperd_cancel_by_id_and_by_path_for_queued_and_running_jobs(
    daemon_factory: DaemonFactory, long_clip: Path, speech: SpeechFactory
) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(long_clip, "first.wav")
    daemon.wait_for_state("first.wav", JobState.RUNNING, timeout=30)
    for name in ("queued-by-id", "queued-by-path"):
        daemon.drop(speech(SENTENCES[3], name))
    by_id = daemon.wait_for_state("queued-by-id.wav", JobState.QUEUED, timeout=30)
    daemon.wait_for_state("queued-by-path.wav", JobState.QUEUED, timeout=30)

    reply = daemon.cli("cancel", str(by_id.id))
    assert reply.returncode == 0 and f"job {by_id.id} cancelled" in reply.stdout, reply
    reply = daemon.cli("cancel", str(daemon.inbox / "queued-by-path.wav"))
    assert reply.returncode == 0 and "cancelled" in reply.stdout, reply
    for name in ("queued-by-id.wav", "queued-by-path.wav"):
        job = daemon.wait_for_state(name, JobState.CANCELLED, timeout=CANCEL_SECONDS)
        assert job.attempts == 0
        # Cancelled by id, the file is moved into cancel/ (where a moved file would be).
        daemon.wait_for(lambda n=name: (daemon.cancel / n).is_file(), timeout=30.0, what=f"{name} in cancel/")

    # Running, by id.
    first = wait_until_transcribing(daemon, "first.wav")
    reply = daemon.cli("cancel", str(first.id))
    assert reply.returncode == 0 and "is running" in reply.stdout, reply
    assert_cancelled_cleanly(daemon, "first.wav")

    # Running, by path (relative to the current folder, as a user types it).
    daemon.drop(long_clip, "second.wav")
    wait_until_transcribing(daemon, "second.wav")
    relative = os.path.relpath(daemon.inbox / "second.wav")
    reply = daemon.cli("cancel", relative)
    assert reply.returncode == 0 and "is running" in reply.stdout, reply
    assert_cancelled_cleanly(daemon, "second.wav")

    reply = daemon.cli("cancel", str(first.id))
    assert "already cancelled" in reply.stdout, reply


# --------------------------------------------------------------------------- isolation and races


def test_cancel_never_kills_the_worker_of_another_job(
    daemon_factory: DaemonFactory, long_clip: Path
) -> None:
    # No grace: the pool kills the cancelled job's worker at once, the
    # harshest path; the other slot must not notice.
    daemon = daemon_factory(workers={"cpu_slots": 2, "cancel_grace_seconds": 0.0})
    daemon.start()
    daemon.drop(long_clip, "a.wav")
    daemon.drop(long_clip, "b.wav")
    a = wait_until_transcribing(daemon, "a.wav")
    b = wait_until_transcribing(daemon, "b.wav")
    assert slot_of(a) != slot_of(b)
    pid_b = worker_pids(daemon)[slot_of(b)]

    move_to_cancel(daemon, "a.wav")

    assert_cancelled_cleanly(daemon, "a.wav")
    daemon.wait_for_state("b.wav", JobState.DONE, timeout=180.0)
    assert_complete_outputs(daemon, "b")
    assert worker_pids(daemon)[slot_of(b)] == pid_b
    assert process_running(pid_b)
    assert all(e["slot"] != slot_of(b) for e in daemon.events("worker.killed"))


def test_cancel_racing_the_end_of_a_job_gives_done_or_cancelled_never_both(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory()
    daemon.start()
    clip = speech(SENTENCES[4], "race")
    # Two jobs without a cancel: the first loads the model, the second says
    # how long a warm run takes, to aim the cancels at the end of a run.
    for warm_up in ("warm-0.wav", "warm-1.wav"):
        daemon.drop(clip, warm_up)
        timed = daemon.wait_for_state(warm_up, JobState.DONE, timeout=120.0)
    assert timed.started_at is not None and timed.finished_at is not None
    run_seconds = timed.finished_at - timed.started_at

    outcomes: dict[str, JobState] = {}
    for attempt, share in enumerate((0.6, 0.8, 0.9, 1.0, 1.1), start=1):
        name = f"race-{attempt}.wav"
        daemon.drop(clip, name)
        daemon.wait_for_state(name, JobState.RUNNING, timeout=60.0)
        job = daemon.job_for(name)
        assert job is not None and job.started_at is not None
        time.sleep(max(0.0, job.started_at + run_seconds * share - time.time()))
        daemon.store.request_cancel(job.id, reason="race test")  # what `whisperd cancel ID` does
        ended = daemon.wait_for_state(name, JobState.DONE, JobState.CANCELLED, timeout=60.0)
        outcomes[name] = ended.state
        stem = Path(name).stem
        if ended.state is JobState.DONE:
            assert_complete_outputs(daemon, stem)
        else:
            assert outputs_named(daemon, stem) == []
        # The end state holds: no late flip, no late output, no half file.
        time.sleep(1.0)
        after = daemon.job_for(name)
        assert after is not None and after.state is ended.state, outcomes
        if ended.state is JobState.DONE:
            assert_complete_outputs(daemon, stem)
        else:
            assert outputs_named(daemon, stem) == []
    assert set(outcomes.values()) <= {JobState.DONE, JobState.CANCELLED}
