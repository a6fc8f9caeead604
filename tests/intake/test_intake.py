"""Intake on its own thread: the watcher hands over and returns at once, a
store behind a held write lock stalls intake alone, a cancel reaches a running
job's worker before the store can record it, a failed file is tried again,
and a new file waiting for the job at its path survives a restart (the store
holds it). Real SQLite files and PostgreSQL, real daemons, real lock holders."""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import SENTENCES, SpeechFactory, wer
from tests.daemon.test_recovery import DaemonFactory
from tests.daemon_harness import DaemonUnderTest
from tests.intake.test_cancel import wait_until_transcribing
from tests.store.test_store_outage import write_lock_held
from whisperd.config import Config
from whisperd.config_load import load_config
from whisperd.errors import StoreUnavailable
from whisperd.intake.intake import ENQUEUE_BATCH, Intake, IntakeOwner
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, Job, JobSpec, JobState
from whisperd.lifecycle import Lifecycle
from whisperd.metrics.registry import Metrics
from whisperd.store.job_store import JobStore
from whisperd.store.outage import RetryPolicy
from whisperd.watch.rules import WatchSpec

# Generous: two busy cores shared with other tests.
WAIT_SECONDS = 60.0


class Rig:
    """A real Intake on a real store, owned the way the daemon owns it: its
    pool requests land on a queue the test reads, as the daemon's loop would."""

    def __init__(self, root: Path, url: str | None = None, *, retry: bool = True) -> None:
        setup = DaemonUnderTest(root, root / "models", database_url=url)
        (root / "models").mkdir(exist_ok=True)
        self.config: Config = load_config(str(setup.config_path))
        self.url = setup.database_url
        inbox = self.config.inboxes[0]
        for folder in (inbox.path, inbox.output, inbox.cancel, inbox.done, inbox.failed):
            os.makedirs(folder, exist_ok=True)
        self.inbox, self.cancel = Path(inbox.path), Path(inbox.cancel)
        self.spec = WatchSpec(name=inbox.name, root=inbox.path, cancel_dir=inbox.cancel)
        self.stopping = threading.Event()
        policy = RetryPolicy(stop=self.stopping, max_delay_seconds=0.5) if retry else None
        self.store = JobStore.open(self.url, busy_timeout_seconds=0.2, retry=policy)
        self.requests: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self.seen: list[tuple[str, int]] = []
        self.metrics = Metrics(job_counts=dict, running_jobs=list, devices=None, version="test")
        self.intake = self.new_intake()

    def new_intake(self) -> Intake:
        owner = IntakeOwner(
            wake_workers=lambda: self.requests.put(("wake", 0)),
            stop_running_job=lambda job_id: self.requests.put(("stop_job", job_id)),
            count_cancel=lambda job, running: self.metrics.job_cancelled(job.spec.inbox, was_running=running),
            dispose=Lifecycle(self.store).dispose_logged,
            metrics=self.metrics,
        )
        return Intake(self.store, self.config, owner, running_since=0.0)

    def drop(self, name: str, content: bytes = b"RIFF audio") -> tuple[str, FileIdentity]:
        path = self.inbox / name
        temp = self.inbox / f".{name}.part"
        temp.write_bytes(content)
        os.replace(temp, path)
        return str(path), FileIdentity.of(str(path))

    def intake_spec(self, rel_path: str) -> JobSpec:
        return self.config.inboxes[0].job_spec(rel_path, self.config.models.default)

    def jobs_at(self, name: str) -> list[Job]:
        return [j for j in self.store.list_jobs(limit=10_000) if j.spec.rel_path == name]

    def taken(self) -> list[tuple[str, int]]:
        """The pool requests intake made since the last call."""
        found = []
        while True:
            try:
                found.append(self.requests.get_nowait())
            except queue.Empty:
                self.seen += found
                return found

    def requests_seen(self) -> list[tuple[str, int]]:
        """Every pool request intake made so far."""
        self.taken()
        return self.seen

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.stopping.set()
        self.intake.stop(WAIT_SECONDS)
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "rig")
    made.intake.start()
    yield made
    made.close()


def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Poll until predicate() is true (a condition, never a fixed sleep)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------- intake's queue


def test_settled_files_are_queued_in_batches_and_workers_woken_per_batch(rig: Rig) -> None:
    files = [rig.drop(f"f{n:03}.wav", f"audio {n}".encode()) for n in range(ENQUEUE_BATCH + 5)]
    rig.intake.on_settled_many(rig.spec, files)
    assert rig.intake.wait_idle(WAIT_SECONDS)
    jobs = rig.store.list_jobs(states=[JobState.QUEUED], limit=10_000)
    assert sorted(j.spec.rel_path for j in jobs) == sorted(os.path.basename(p) for p, _ in files)
    assert rig.taken() == [("wake", 0), ("wake", 0)]  # one per transaction
    assert rig.counter("whisperd_jobs_queued_total", inbox="main") == ENQUEUE_BATCH + 5


def test_the_callback_returns_while_the_store_is_locked_and_the_file_is_queued_after(rig: Rig) -> None:
    path, identity = rig.drop("late.wav")
    with write_lock_held(Path(rig.url.removeprefix("sqlite:///"))):
        rig.intake.on_settled(rig.spec, path, identity)  # returns: the settle thread goes on
        second, second_identity = rig.drop("second.wav")
        rig.intake.on_settled(rig.spec, second, second_identity)
        assert rig.jobs_at("late.wav") == []
        assert not rig.intake.wait_idle(0.0)  # both still in intake's hands
    wait_for(lambda: bool(rig.jobs_at("late.wav")) and bool(rig.jobs_at("second.wav")), "both queued")
    assert [j.state for j in rig.jobs_at("late.wav")] == [JobState.QUEUED]


def test_a_cancel_reaches_the_running_job_before_the_store_can_record_it(rig: Rig) -> None:
    path, identity = rig.drop("talk.wav")
    job, _ = rig.store.enqueue(rig.intake_spec("talk.wav"), identity, max_attempts=3)
    claim = rig.store.claim(worker="test/cpu0", device="cpu", lease_seconds=60)
    assert claim is not None and claim.job.id == job.id
    os.rename(path, rig.cancel / "talk.wav")
    with write_lock_held(Path(rig.url.removeprefix("sqlite:///"))):
        rig.intake.on_cancel(rig.spec, str(rig.cancel / "talk.wav"), identity)
        wait_for(lambda: ("stop_job", job.id) in rig.requests_seen(), "the worker told to stop")
        assert rig.store.get(job.id).cancel_requested is False  # type: ignore[union-attr]
    wait_for(lambda: rig.store.get(job.id).cancel_requested, "the cancel recorded")  # type: ignore[union-attr]
    assert rig.counter("whisperd_job_cancels_total", inbox="main", phase="running") == 1


def test_a_file_that_fails_is_logged_counted_and_tried_again(tmp_path: Path) -> None:
    """No retry policy: the locked store raises StoreUnavailable at once."""
    rig = Rig(tmp_path / "rig", retry=False)
    rig.intake.start()
    try:
        path, identity = rig.drop("flaky.wav")
        with capture_logs() as logs, write_lock_held(Path(rig.url.removeprefix("sqlite:///"))):
            rig.intake.on_settled(rig.spec, path, identity)
            wait_for(
                lambda: any(e["event"] == "job.handling_failed" for e in list(logs)), "the failure logged"
            )
        failed = next(e for e in logs if e["event"] == "job.handling_failed")
        assert failed["file"] == "flaky.wav" and StoreUnavailable.__name__ in failed["error"]
        assert rig.counter("whisperd_job_handling_errors_total", stage="intake_settled") >= 1
        wait_for(lambda: bool(rig.jobs_at("flaky.wav")), "the file queued on a later try")
        assert rig.intake.wait_idle(WAIT_SECONDS)
    finally:
        rig.close()


def test_a_failed_file_that_is_gone_by_the_retry_gets_no_job(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "rig", retry=False)
    rig.intake.start()
    try:
        path, identity = rig.drop("gone.wav")
        kept, kept_identity = rig.drop("kept.wav")
        with write_lock_held(Path(rig.url.removeprefix("sqlite:///"))):
            rig.intake.on_settled_many(rig.spec, [(path, identity), (kept, kept_identity)])
            assert rig.intake.wait_idle(WAIT_SECONDS)  # handled once: failed, kept for a retry
            os.unlink(path)
        wait_for(lambda: bool(rig.jobs_at("kept.wav")), "the file still there queued")
        assert rig.jobs_at("gone.wav") == []
    finally:
        rig.close()


def test_a_replacement_waits_in_the_store_and_is_queued_once_the_job_ends(rig: Rig) -> None:
    path, old = rig.drop("memo.wav", b"first take")
    rig.intake.on_settled(rig.spec, path, old)
    assert rig.intake.wait_idle(WAIT_SECONDS)
    (first,) = rig.jobs_at("memo.wav")
    rig.store.claim(worker="test/cpu0", device="cpu", lease_seconds=60)
    _, new = rig.drop("memo.wav", b"second take, longer")  # replaced: a new inode at the path
    assert new.inode != old.inode
    rig.intake.on_settled(rig.spec, path, new)
    assert rig.intake.wait_idle(WAIT_SECONDS)
    (waiting,) = rig.store.deferred_files(["main"], ready_only=False)
    assert (waiting.identity, waiting.waits_for) == (new, first.id)
    assert rig.store.deferred_files(["main"]) == []  # its job still runs

    # A restart: a new intake on the same store, the first one gone.
    rig.intake.stop(WAIT_SECONDS)
    rig.store.request_cancel(first.id, reason="test: the first take ends")
    claim = rig.store.get(first.id)
    assert claim is not None and claim.claim_token is not None
    ended = rig.store.end_attempt(
        first.id, claim.claim_token, AttemptEnd(outcome=AttemptOutcome.CANCELLED, error="test: ended")
    )
    assert ended is JobState.CANCELLED
    rig.intake = rig.new_intake()
    rig.intake.start()  # looks at the waiting files at once
    wait_for(lambda: len(rig.jobs_at("memo.wav")) == 2, "the replacement queued")
    second = max(rig.jobs_at("memo.wav"), key=lambda j: j.id)
    assert (second.state, second.identity) == (JobState.QUEUED, new)
    assert rig.store.deferred_files(["main"], ready_only=False) == []
    assert ("wake", 0) in rig.taken()


def test_a_waiting_file_replaced_again_or_removed_is_forgotten(rig: Rig) -> None:
    path, old = rig.drop("memo.wav", b"first")
    rig.intake.on_settled(rig.spec, path, old)
    assert rig.intake.wait_idle(WAIT_SECONDS)
    (first,) = rig.jobs_at("memo.wav")
    _, new = rig.drop("memo.wav", b"second")
    rig.intake.on_settled(rig.spec, path, new)
    assert rig.intake.wait_idle(WAIT_SECONDS)
    assert len(rig.store.deferred_files(["main"], ready_only=False)) == 1
    os.unlink(path)
    rig.store.request_cancel(first.id, reason="test")  # queued: ends at once
    rig.intake.check_deferred()
    assert rig.intake.wait_idle(WAIT_SECONDS)
    assert rig.store.deferred_files(["main"], ready_only=False) == []
    assert len(rig.jobs_at("memo.wav")) == 1


# ------------------------------------------------------------------- the store's deferral table


def test_the_store_keeps_one_waiting_file_per_path(tmp_path: Path, store_url: str) -> None:
    rig = Rig(tmp_path / "rig", store_url)
    try:
        _, old = rig.drop("a.wav", b"one")
        job, _ = rig.store.enqueue(rig.intake_spec("a.wav"), old, max_attempts=3)
        _, second = rig.drop("a.wav", b"two")
        rig.store.defer_file(rig.intake_spec("a.wav"), second, waits_for=job.id)
        _, third = rig.drop("a.wav", b"three")
        rig.store.defer_file(rig.intake_spec("a.wav"), third, waits_for=job.id)
        (waiting,) = rig.store.deferred_files(["main"], ready_only=False)
        assert waiting.identity == third and waiting.spec == rig.intake_spec("a.wav")
        assert (
            rig.store.deferred_files(["main"]) == []
            and rig.store.deferred_files(["other"], ready_only=False) == []
        )

        rig.store.request_cancel(job.id, reason="test")
        assert rig.store.deferred_files(["main"]) == [waiting]
        assert not rig.store.forget_deferred(dataclasses.replace(waiting, identity=second))  # not that file
        queued, created = rig.store.enqueue_deferred(waiting, third, max_attempts=3)
        assert created and queued.identity == third
        assert rig.store.deferred_files(["main"], ready_only=False) == []
    finally:
        rig.stopping.set()
        rig.store.close()


def test_a_waiting_file_finding_another_job_at_its_path_waits_for_that_one(
    tmp_path: Path, store_url: str
) -> None:
    rig = Rig(tmp_path / "rig", store_url)
    try:
        _, old = rig.drop("a.wav", b"one")
        spec = rig.intake_spec("a.wav")
        first, _ = rig.store.enqueue(spec, old, max_attempts=3)
        _, new = rig.drop("a.wav", b"two")
        rig.store.defer_file(spec, new, waits_for=first.id)
        rig.store.request_cancel(first.id, reason="test")
        _, other = rig.drop("a.wav", b"three")
        blocking, _ = rig.store.enqueue(spec, other, max_attempts=3)  # someone else got there first
        (waiting,) = rig.store.deferred_files(["main"])  # ready: its job ended
        job, created = rig.store.enqueue_deferred(waiting, new, max_attempts=3)
        assert not created and job.id == blocking.id
        (still,) = rig.store.deferred_files(["main"], ready_only=False)
        assert still.waits_for == blocking.id and rig.store.deferred_files(["main"]) == []
        assert rig.store.forget_deferred(still)
    finally:
        rig.stopping.set()
        rig.store.close()


# ------------------------------------------------------------------- the real daemon


def test_a_cancel_and_a_new_drop_under_a_held_write_lock(
    daemon_factory: DaemonFactory, speech: SpeechFactory, long_clip: Path
) -> None:
    """Another process holds the SQLite write lock for seconds: a file moved
    into cancel/ stops its running job's worker at once, a new file settles
    and is handed to intake meanwhile; once the lock is gone the cancel's end
    state is written and the new file is queued and transcribed."""
    daemon = daemon_factory(daemon={"database_busy_timeout_seconds": 0.5})
    fresh = speech(SENTENCES[1], "fresh")
    daemon.start()
    daemon.store  # noqa: B018 - opened (schema checked) before the lock
    daemon.drop(long_clip, "long.wav")
    job = wait_until_transcribing(daemon, "long.wav")

    with write_lock_held(daemon.state_dir / "jobs.db"):
        os.rename(daemon.inbox / "long.wav", daemon.cancel / "long.wav")
        daemon.wait_for_event("job.cancelling", job_id=job.id)
        daemon.drop(fresh)
        # The settle thread is not stuck behind the store: it hands the file over.
        daemon.wait_for_event("intake.received", kind="settled", first="fresh.wav")
        # Intake's cancel write waits for the lock (the store counts it as unreachable).
        daemon.wait_for(lambda: bool(daemon.events("store.unreachable")), what="the outage logged")
        assert daemon.job_for("fresh.wav") is None  # nothing written while the lock is held
        assert daemon.job_for("long.wav").state is JobState.RUNNING  # type: ignore[union-attr]

    cancelled = daemon.wait_for_state("long.wav", JobState.CANCELLED, JobState.DONE, JobState.FAILED)
    assert cancelled.state is JobState.CANCELLED, daemon.log_text()
    done = daemon.wait_for_state("fresh.wav", JobState.DONE, JobState.FAILED, timeout=180.0)
    assert done.state is JobState.DONE, daemon.log_text()
    assert daemon.stop() == 0


def test_a_replacement_waiting_for_a_running_job_survives_a_restart(
    daemon_factory: DaemonFactory, speech: SpeechFactory, long_clip: Path
) -> None:
    """A file replaced at the path of a running job waits (in the store) for
    that job; the daemon is killed before the job ends; after the restart the
    new file is transcribed and nothing waits any more."""
    daemon = daemon_factory()
    replacement = speech(SENTENCES[2], "replacement")
    daemon.start()
    daemon.drop(long_clip, "memo.wav")
    first = wait_until_transcribing(daemon, "memo.wav")
    temp = daemon.inbox / ".memo.wav.part"
    shutil.copyfile(replacement, temp)
    os.replace(temp, daemon.inbox / "memo.wav")  # a new file (new inode) at the running job's path
    new = FileIdentity.of(str(daemon.inbox / "memo.wav"))
    daemon.wait_for_event("job.replacement_waits", file="memo.wav", waits_for=first.id)
    daemon.stop(signal.SIGKILL)

    (waiting,) = daemon.store.deferred_files(["main"], ready_only=False)
    assert (waiting.identity.inode, waiting.waits_for) == (new.inode, first.id)

    daemon.start()

    def transcribed() -> bool:
        return any(
            j.state is JobState.DONE and j.identity.inode == new.inode for j in daemon.jobs()
        ) and not daemon.store.list_jobs(states=[JobState.QUEUED, JobState.RUNNING], limit=10)

    daemon.wait_for(transcribed, timeout=300.0, what="the replacement transcribed")
    (done,) = [j for j in daemon.jobs() if j.state is JobState.DONE and j.identity.inode == new.inode]
    text = Path(next(p for p in done.outputs if p.endswith(".txt"))).read_text(encoding="utf-8")
    assert wer(SENTENCES[2], text) < 0.5, text
    daemon.wait_for(
        lambda: daemon.store.deferred_files(["main"], ready_only=False) == [], what="nothing waits any more"
    )
    assert daemon.stop() == 0
