"""The lifecycle seam: the one rule of how an attempt ends (on SQLite and
PostgreSQL), and every step of its file-system consequences surviving a crash.

The crash tests drive `Lifecycle` on a real store and real folders, crash it
(an exception raised at an armed crash point) after one step, then replay
what the store says is still owed with a fresh Lifecycle, as the daemon's
sweep and start-up recovery do, and check what a user would see.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from whisperd import crash_points
from whisperd.events import JobFinished, WorkerEvent
from whisperd.jobs import AttemptEnd, AttemptOutcome, Claim, FileIdentity, Job, JobSpec, JobState
from whisperd.lifecycle import Lifecycle
from whisperd.store.job_store import JobStore

T0 = 1_700_000_000.0
LEASE = 30.0


class Crash(Exception):
    """Stands for a power cut at one step of an end."""


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


class Folders:
    """An inbox with its output, done, failed and cancel folders."""

    def __init__(self, root: Path) -> None:
        self.inbox = root / "inbox"
        self.output = root / "output"
        self.done = root / "done"
        self.failed = root / "failed"
        self.cancel = root / "cancel"
        for folder in (self.inbox, self.output, self.done, self.failed, self.cancel):
            folder.mkdir(parents=True)

    def spec(self, name: str) -> JobSpec:
        return JobSpec(
            inbox="talks",
            inbox_root=str(self.inbox),
            rel_path=name,
            model="tiny.en",
            output_dir=str(self.output),
            done_dir=str(self.done),
            failed_dir=str(self.failed),
            cancel_dir=str(self.cancel),
        )

    def drop(self, store: JobStore, name: str, *, max_attempts: int = 3, now: float = T0) -> Job:
        path = self.inbox / name
        path.write_bytes(b"RIFF " + name.encode())
        job, created = store.enqueue(
            self.spec(name), FileIdentity.of(str(path)), max_attempts=max_attempts, now=now
        )
        assert created
        return job


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def claim(store: JobStore, *, worker: str = "host-a/0", now: float = T0) -> Claim:
    taken = store.claim(worker=worker, device="cpu", lease_seconds=LEASE, now=now)
    assert taken is not None
    return taken


def write_outputs(store: JobStore, taken: Claim, folders: Folders) -> tuple[str, ...]:
    """What a worker does before its job is done: record, then write, the outputs."""
    stem = os.path.splitext(taken.job.spec.rel_path)[0]
    paths = tuple(str(folders.output / f"{stem}.{fmt}") for fmt in ("txt", "srt"))
    assert store.set_outputs(taken.job.id, taken.token, paths)
    for path in paths:
        Path(path).write_text("hello\n", encoding="utf-8")
    return paths


# ------------------------------------------------------------------- the rule ---


def test_a_requested_cancel_wins_over_a_retry_and_a_release(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    for name, outcome in (("retry.wav", AttemptOutcome.RETRY), ("released.wav", AttemptOutcome.RELEASED)):
        job = folders.drop(store, name)
        taken = claim(store)
        store.request_cancel(job.id, reason="moved to cancel/", now=T0 + 1)
        end = AttemptEnd(outcome=outcome, error="stopped")
        assert store.end_attempt(job.id, taken.token, end, now=T0 + 2) is JobState.CANCELLED
        ended = store.get(job.id)
        assert ended is not None and ended.state is JobState.CANCELLED
        assert ended.last_error == "moved to cancel/"  # why it ended: the cancel


def test_a_done_job_stays_done_though_a_cancel_came_late(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    taken = claim(store)
    store.request_cancel(job.id, reason="too late", now=T0 + 1)
    assert store.end_attempt(job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 2) is (
        JobState.DONE
    )


def test_a_failed_attempt_is_retried_until_attempts_run_out(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav", max_attempts=2)
    end = AttemptEnd(outcome=AttemptOutcome.RETRY, error="disk full", retry_base_seconds=0.0)
    states = []
    for step in range(2):
        taken = claim(store, now=T0 + step)
        states.append(store.end_attempt(job.id, taken.token, end, now=T0 + step))
    assert states == [JobState.QUEUED, JobState.FAILED]
    failed = store.get(job.id)
    assert failed is not None and failed.last_error == "disk full" and failed.attempts == 2


def test_a_release_is_uncounted_and_carries_the_new_identity(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav", max_attempts=1)
    taken = claim(store)
    source = folders.inbox / "talk.wav"
    source.write_bytes(b"RIFF the recording went on")
    grown = FileIdentity.of(str(source))
    end = AttemptEnd(outcome=AttemptOutcome.RELEASED, error="file changed", identity=grown)

    assert store.end_attempt(job.id, taken.token, end, now=T0 + 1) is JobState.QUEUED
    again = claim(store, now=T0 + 1)
    assert again.job.id == job.id and again.job.attempts == 1  # one attempt allowed, still there
    assert again.job.identity == grown


def test_ending_twice_returns_the_state_reached_and_a_lost_lease_none(
    store: JobStore, tmp_path: Path
) -> None:
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    taken = claim(store)
    failed = AttemptEnd(outcome=AttemptOutcome.FAILED, error="not media")
    assert store.end_attempt(job.id, taken.token, failed, now=T0 + 1) is JobState.FAILED
    assert store.end_attempt(job.id, taken.token, failed, now=T0 + 2) is JobState.FAILED
    assert store.end_attempt(job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 2) is None
    assert [a.outcome for a in store.attempts_of(job.id)] == ["failed"]

    other = folders.drop(store, "other.wav")
    stale = claim(store, now=T0)
    store.reclaim_stale(now=T0 + LEASE + 1)
    assert store.end_attempt(other.id, stale.token, AttemptEnd(outcome=AttemptOutcome.DONE)) is None


def test_an_expired_lease_follows_the_same_rule(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    cancelled = folders.drop(store, "cancelled.wav")
    claim(store, now=T0)
    store.request_cancel(cancelled.id, reason="user", now=T0 + 1)
    spent = folders.drop(store, "spent.wav", max_attempts=1)
    claim(store, now=T0)

    after = {job.id: job for job in store.reclaim_stale(now=T0 + LEASE + 1)}
    assert after[cancelled.id].state is JobState.CANCELLED
    assert after[spent.id].state is JobState.FAILED
    assert after[spent.id].last_error == "worker died 1 times on this file (last: host-a/0)"


def test_running_of_instance_finds_only_that_instances_jobs(store: JobStore, tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    for index, worker in enumerate(("host-a/0", "host-a/cuda0", "host-ab/0", "HOST-A/0", "host-a_/0")):
        folders.drop(store, f"clip-{index}.wav")
        claim(store, worker=worker)
    folders.drop(store, "queued.wav")

    found = store.running_of_instance("host-a")
    assert sorted(job.worker or "" for job in found) == ["host-a/0", "host-a/cuda0"]
    assert all(job.state is JobState.RUNNING for job in found)


# ------------------------------------------------------------ the consequences ---


def test_a_done_end_moves_the_source_and_tells_the_metrics(tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    taken = claim(store)
    written = write_outputs(store, taken, folders)
    events: list[WorkerEvent] = []
    seam = Lifecycle(store, events.append)

    end = AttemptEnd(outcome=AttemptOutcome.DONE, outputs=written, audio_seconds=2.0)
    assert seam.end_attempt(job, taken.token, end, device="cpu", duration_seconds=1.0) is JobState.DONE

    assert files_in(folders.done) == ["talk.wav"] and files_in(folders.inbox) == []
    assert files_in(folders.output) == ["talk.srt", "talk.txt"]
    finished = [dataclasses.asdict(e) for e in events if isinstance(e, JobFinished)]
    assert finished == [
        {
            "job_id": job.id,
            "inbox": "talks",
            "outcome": "done",
            "device": "cpu",
            "duration_seconds": 1.0,
            "audio_seconds": 2.0,
        }
    ]
    store.close()


def test_a_released_end_removes_the_attempts_partial_outputs(tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    taken = claim(store)
    write_outputs(store, taken, folders)

    end = AttemptEnd(outcome=AttemptOutcome.RELEASED, error="daemon stopped")
    assert Lifecycle(store).end_attempt(job, taken.token, end) is JobState.QUEUED

    assert files_in(folders.output) == []
    assert files_in(folders.inbox) == ["talk.wav"]  # still to be transcribed
    store.close()


# ------------------------------------------------------------------- crashes ---

DONE_STEPS = [
    crash_points.AFTER_TRANSITION,
    crash_points.AFTER_OUTPUTS_REMOVED,
    crash_points.AFTER_SOURCE_MOVED,
    crash_points.BEFORE_MARK_DISPOSED,
]
FAILED_STEPS = [*DONE_STEPS[:3], crash_points.AFTER_NOTE_WRITTEN, crash_points.BEFORE_MARK_DISPOSED]
CASES = [(AttemptOutcome.DONE, step) for step in DONE_STEPS] + [
    (AttemptOutcome.FAILED, step) for step in FAILED_STEPS
]


def crash(step: str) -> Any:
    def stop_here() -> None:
        raise Crash(step)

    return stop_here


def replay(store: JobStore) -> None:
    """What the daemon does at its next start: dispose of every owed end."""
    seam = Lifecycle(store)
    for job in store.undisposed():
        assert seam.dispose(job) is None


@pytest.mark.parametrize(("outcome", "step"), CASES)
def test_a_crash_at_any_step_of_an_end_converges_on_replay(
    tmp_path: Path, outcome: AttemptOutcome, step: str
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    taken = claim(store)
    written = write_outputs(store, taken, folders)
    end = (
        AttemptEnd(outcome=AttemptOutcome.DONE, outputs=written)
        if outcome is AttemptOutcome.DONE
        else AttemptEnd(outcome=AttemptOutcome.FAILED, error="talk.wav: not a media file")
    )

    with pytest.raises(Crash), crash_points.armed(step, crash(step)):
        Lifecycle(store).end_attempt(job, taken.token, end)
    replay(store)
    replay(store)  # and once more: nothing changes

    (after,) = store.list_jobs()  # no second job
    assert after.id == job.id and after.disposed_at is not None
    assert files_in(folders.inbox) == []
    if outcome is AttemptOutcome.DONE:
        assert after.state is JobState.DONE
        assert files_in(folders.done) == ["talk.wav"]
        assert after.disposed_to == str(folders.done / "talk.wav")
        assert files_in(folders.output) == ["talk.srt", "talk.txt"]
    else:
        assert after.state is JobState.FAILED
        assert files_in(folders.failed) == ["talk.wav", "talk.wav.error.txt"]
        assert after.disposed_to == str(folders.failed / "talk.wav")
        note = (folders.failed / "talk.wav.error.txt").read_text(encoding="utf-8")
        assert "not a media file" in note and str(folders.failed / "talk.wav") in note
        assert files_in(folders.output) == []  # no partial outputs
    store.close()


def test_a_queued_cancel_is_disposed_of_into_the_cancel_folder(tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    folders = Folders(tmp_path)
    job = folders.drop(store, "talk.wav")
    cancelled = store.request_cancel(job.id, reason="whisperd cancel")
    assert cancelled is not None and cancelled.state is JobState.CANCELLED

    assert Lifecycle(store).dispose(cancelled) is None

    assert files_in(folders.cancel) == ["talk.wav"] and files_in(folders.inbox) == []
    after = store.get(job.id)
    assert after is not None and after.disposed_to == str(folders.cancel / "talk.wav")
    store.close()
