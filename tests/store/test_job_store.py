"""The job store's contract suite: every case runs on SQLite and on the real
PostgreSQL (the `store_url` fixture of conftest.py; the PostgreSQL cases carry
the `postgres` marker).

Each public call of JobStore has at least one case here (TestEveryVerb checks
that by name); the roles of store/values.py are made of these calls. Deeper
cases of some verbs live beside it on the same fixture: test_operator_store.py
(history, retry, pause, retention), test_store_hooks.py, test_instances.py,
test_job_store_concurrency.py; the SQLite-only cases of opening are at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from whisperd.errors import WhisperdError
from whisperd.jobs import AttemptEnd, AttemptOutcome, Claim, FileIdentity, Job, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.rows import new_row
from whisperd.store.schema import MIGRATIONS, SCHEMA_VERSION
from whisperd.store.values import InstanceEntry

T0 = 1_700_000_000.0
LEASE = 30.0


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


class Inbox:
    """A real inbox folder: drop() writes a file and returns its spec and identity."""

    def __init__(self, root: Path, name: str = "talks") -> None:
        self.root = root
        self.name = name
        root.mkdir(parents=True, exist_ok=True)

    def spec(self, rel_path: str, *, priority: int = 0) -> JobSpec:
        return JobSpec(
            inbox=self.name,
            inbox_root=str(self.root),
            rel_path=rel_path,
            model="tiny.en",
            priority=priority,
        )

    def drop(
        self, rel_path: str, content: bytes = b"RIFF fake audio", *, priority: int = 0
    ) -> tuple[JobSpec, FileIdentity]:
        path = self.root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return self.spec(rel_path, priority=priority), FileIdentity.of(str(path))


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    return Inbox(tmp_path / "inbox")


def enqueue(
    store: JobStore, inbox: Inbox, name: str, *, priority: int = 0, max_attempts: int = 3, now: float = T0
) -> Job:
    spec, identity = inbox.drop(name, name.encode(), priority=priority)
    job, created = store.enqueue(spec, identity, max_attempts=max_attempts, now=now)
    assert created
    return job


def claim(store: JobStore, worker: str = "host-a/0", *, now: float = T0, lease: float = LEASE) -> Claim:
    taken = store.claim(worker=worker, device="cpu", lease_seconds=lease, now=now)
    assert taken is not None, "expected a claimable job"
    return taken


class TestJobStoreContract:
    # ------------------------------------------------------------ enqueue ---

    def test_same_file_enqueued_twice_gives_one_job(self, store: JobStore, inbox: Inbox) -> None:
        spec, identity = inbox.drop("talk.wav")
        first, created_first = store.enqueue(spec, identity, max_attempts=3, now=T0)
        # A second event for the same path, even after the file changed, is the same job.
        changed = FileIdentity(device=identity.device, inode=identity.inode + 1, size=1, mtime_ns=1)
        second, created_second = store.enqueue(spec, changed, max_attempts=3, now=T0 + 1)

        assert (created_first, created_second) == (True, False)
        assert second.id == first.id
        assert second.identity == identity
        assert store.counts()[JobState.QUEUED] == 1
        assert first.spec == spec
        assert first.source == str(inbox.root / "talk.wav")

    def test_same_name_in_another_inbox_is_another_job(self, store: JobStore, tmp_path: Path) -> None:
        spec_a, identity_a = Inbox(tmp_path / "a", "a").drop("talk.wav")
        spec_b, identity_b = Inbox(tmp_path / "b", "b").drop("talk.wav")
        job_a, _ = store.enqueue(spec_a, identity_a, max_attempts=3)
        job_b, created = store.enqueue(spec_b, identity_b, max_attempts=3)
        assert created
        assert job_a.id != job_b.id

    def test_file_dropped_again_after_its_job_ended_gets_a_new_job(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        old = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        assert store.end_attempt(old.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 5)

        spec, identity = inbox.drop("talk.wav", b"recorded again")
        new, created = store.enqueue(spec, identity, max_attempts=3, now=T0 + 10)

        assert created
        assert new.id != old.id
        assert new.state is JobState.QUEUED
        assert store.get(old.id).state is JobState.DONE  # type: ignore[union-attr]

    def test_enqueue_rejects_zero_attempts(self, store: JobStore, inbox: Inbox) -> None:
        spec, identity = inbox.drop("talk.wav")
        with pytest.raises(ValueError, match=r"talk\.wav"):
            store.enqueue(spec, identity, max_attempts=0)

    # -------------------------------------------------------------- claim ---

    def test_claim_takes_higher_priority_first_then_older(self, store: JobStore, inbox: Inbox) -> None:
        low_old = enqueue(store, inbox, "low-old.wav", priority=0)
        high_old = enqueue(store, inbox, "high-old.wav", priority=5)
        low_new = enqueue(store, inbox, "low-new.wav", priority=0)
        high_new = enqueue(store, inbox, "high-new.wav", priority=5)

        order = [claim(store).job.id for _ in range(4)]

        assert order == [high_old.id, high_new.id, low_old.id, low_new.id]
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=T0) is None

    def test_claim_marks_the_job_running_and_counts_the_attempt(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = store.claim(worker="host-a/1", device="cuda:1", lease_seconds=60, now=T0 + 2)
        assert taken is not None

        stored = store.get(job.id)
        assert stored == taken.job
        assert stored.state is JobState.RUNNING
        assert stored.attempts == 1
        assert (stored.worker, stored.device) == ("host-a/1", "cuda:1")
        assert stored.claim_token == taken.token
        assert stored.lease_expires == pytest.approx(T0 + 62)
        assert stored.started_at == pytest.approx(T0 + 2)

    def test_claim_only_from_given_inboxes(self, store: JobStore, tmp_path: Path) -> None:
        news = Inbox(tmp_path / "news", "news")
        music = Inbox(tmp_path / "music", "music")
        enqueue(store, news, "a.wav")
        wanted = enqueue(store, music, "b.wav")

        taken = store.claim(worker="w", device="cpu", lease_seconds=LEASE, inboxes=["music"], now=T0)
        assert taken is not None and taken.job.id == wanted.id
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, inboxes=["music"], now=T0) is None
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, inboxes=[], now=T0) is None

    # ---------------------------------------------------- retry / backoff ---

    def test_failed_attempt_waits_out_its_backoff(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav", max_attempts=3)
        first = claim(store, now=T0)

        state = store.end_attempt(
            job.id,
            first.token,
            AttemptEnd(outcome=AttemptOutcome.RETRY, error="ffmpeg crashed", retry_base_seconds=10),
            now=T0,
        )

        assert state is JobState.QUEUED
        queued = store.get(job.id)
        assert queued is not None
        assert queued.last_error == "ffmpeg crashed"
        assert queued.claim_token is None
        assert T0 + 5 <= queued.not_before <= T0 + 15  # 10 s * jitter 0.5..1.5
        assert (
            store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=queued.not_before - 0.01) is None
        )
        second = claim(store, now=queued.not_before)
        assert second.job.id == job.id
        assert second.job.attempts == 2

        # The second failure waits twice as long.
        at = queued.not_before
        store.end_attempt(
            job.id,
            second.token,
            AttemptEnd(outcome=AttemptOutcome.RETRY, error="again", retry_base_seconds=10),
            now=at,
        )
        again = store.get(job.id)
        assert again is not None
        assert at + 10 <= again.not_before <= at + 30

    def test_backoff_jitter_stays_within_bounds_and_under_the_cap(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        delays = []
        for i in range(12):
            enqueue(store, inbox, f"clip-{i}.wav", max_attempts=5)
        for _ in range(12):
            taken = claim(store, now=T0)
            # The cap (max_delay) applies before the jitter.
            store.end_attempt(
                taken.job.id,
                taken.token,
                AttemptEnd(
                    outcome=AttemptOutcome.RETRY, error="x", retry_base_seconds=100, retry_max_seconds=40
                ),
                now=T0,
            )
            delays.append(store.get(taken.job.id).not_before - T0)  # type: ignore[union-attr]

        assert all(20 <= d <= 60 for d in delays), delays
        assert len(set(delays)) > 1, "retries should not all wake at the same moment"

    def test_job_fails_for_good_after_max_attempts(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "broken.wav", max_attempts=2)
        now = T0
        states = []
        for _ in range(2):
            taken = claim(store, now=now)
            states.append(
                store.end_attempt(
                    job.id,
                    taken.token,
                    AttemptEnd(outcome=AttemptOutcome.RETRY, error="not audio", retry_base_seconds=1),
                    now=now,
                )
            )
            now += 10

        assert states == [JobState.QUEUED, JobState.FAILED]
        failed = store.get(job.id)
        assert failed is not None
        assert failed.state is JobState.FAILED
        assert failed.attempts == 2
        assert failed.last_error == "not audio"
        assert failed.finished_at == pytest.approx(T0 + 10)
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=now + 1000) is None

    # ------------------------------------------------------------ fencing ---

    def test_stale_token_cannot_write_after_job_was_handed_on(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        old = claim(store, "host-a/0", now=T0, lease=10)
        reclaimed = store.reclaim_stale(now=T0 + 11)
        assert [j.id for j in reclaimed] == [job.id]
        new = claim(store, "host-b/0", now=T0 + 12)
        assert new.job.id == job.id and new.token != old.token

        assert store.heartbeat(job.id, old.token, lease_seconds=10, progress=0.9, now=T0 + 13).ok is False
        assert (
            store.end_attempt(
                job.id, old.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=("x.txt",)), now=T0 + 13
            )
            is None
        )
        assert store.set_outputs(job.id, old.token, ["x.txt"], now=T0 + 13) is False
        assert (
            store.end_attempt(
                job.id, old.token, AttemptEnd(outcome=AttemptOutcome.RELEASED, error="shutdown"), now=T0 + 13
            )
            is None
        )
        assert (
            store.end_attempt(
                job.id, old.token, AttemptEnd(outcome=AttemptOutcome.CANCELLED, error="killed"), now=T0 + 13
            )
            is None
        )
        assert (
            store.end_attempt(
                job.id, old.token, AttemptEnd(outcome=AttemptOutcome.RETRY, error="boom"), now=T0 + 13
            )
            is None
        )

        current = store.get(job.id)
        assert current is not None
        assert (current.state, current.worker, current.claim_token) == (
            JobState.RUNNING,
            "host-b/0",
            new.token,
        )
        assert current.progress == 0.0 and current.outputs == ()
        assert current.attempts == 2

        assert store.heartbeat(job.id, new.token, lease_seconds=10, now=T0 + 14).ok
        assert store.end_attempt(
            job.id, new.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=("talk.txt",)), now=T0 + 15
        )

    def test_ending_is_idempotent_for_the_same_token_and_end(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        assert store.end_attempt(
            job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=("/o/talk.txt",)), now=T0 + 5
        )
        assert store.end_attempt(
            job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=("/o/talk.txt",)), now=T0 + 9
        )
        assert (
            store.end_attempt(
                job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.FAILED, error="late"), now=T0 + 9
            )
            is None
        )

        done = store.get(job.id)
        assert done is not None
        assert done.state is JobState.DONE
        assert done.finished_at == pytest.approx(T0 + 5)
        assert done.outputs == ("/o/talk.txt",)
        assert done.progress == 1.0
        assert done.last_error is None

    # ------------------------------------------------ heartbeat / reclaim ---

    def test_heartbeat_extends_the_lease_and_records_progress(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store, now=T0, lease=10)

        reply = store.heartbeat(
            job.id,
            taken.token,
            lease_seconds=10,
            progress=0.25,
            eta_seconds=42.0,
            audio_seconds=600.0,
            now=T0 + 8,
        )

        assert reply.ok and not reply.cancel_requested
        running = store.get(job.id)
        assert running is not None
        assert (running.progress, running.eta_seconds, running.audio_seconds) == (0.25, 42.0, 600.0)
        assert running.lease_expires == pytest.approx(T0 + 18)
        assert store.reclaim_stale(now=T0 + 12) == []
        assert store.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]
        assert [j.id for j in store.reclaim_stale(now=T0 + 19)] == [job.id]

    def test_reclaim_requeues_a_job_whose_worker_stopped_answering(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        enqueue(store, inbox, "talk.wav")
        claim(store, "host-a/3", now=T0, lease=10)

        (requeued,) = store.reclaim_stale(now=T0 + 11)

        assert requeued.state is JobState.QUEUED
        assert requeued.claim_token is None and requeued.worker is None
        assert requeued.last_error == "lease expired on worker host-a/3"
        assert requeued.attempts == 1
        assert claim(store, now=T0 + 11).job.attempts == 2

    def test_reclaim_fails_a_file_that_keeps_killing_its_worker(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "poison.wav", max_attempts=2)
        now = T0
        results = []
        for _ in range(2):
            claim(store, now=now, lease=10)
            now += 11
            results.extend(store.reclaim_stale(now=now))

        assert [j.state for j in results] == [JobState.QUEUED, JobState.FAILED]
        failed = store.get(job.id)
        assert failed is not None
        assert failed.state is JobState.FAILED
        assert failed.last_error is not None and "worker died 2 times on this file" in failed.last_error

    def test_reclaim_cancels_a_job_whose_cancel_was_requested(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        claim(store, now=T0, lease=10)
        store.request_cancel(job.id, reason="moved to cancel/", now=T0 + 1)

        (after,) = store.reclaim_stale(now=T0 + 11)
        assert after.state is JobState.CANCELLED
        assert after.last_error == "moved to cancel/"

    # ------------------------------------------------------------ release ---

    def test_release_gives_the_job_back_without_using_an_attempt(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav", max_attempts=1)
        taken = claim(store, now=T0)

        assert store.end_attempt(
            job.id,
            taken.token,
            AttemptEnd(outcome=AttemptOutcome.RELEASED, error="daemon stopping"),
            now=T0 + 3,
        )

        released = store.get(job.id)
        assert released is not None
        assert (released.state, released.attempts, released.claim_token) == (JobState.QUEUED, 0, None)
        again = claim(store, now=T0 + 3)
        assert again.job.id == job.id and again.job.attempts == 1
        assert (
            store.end_attempt(
                job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.RELEASED, error="stale"), now=T0 + 4
            )
            is None
        )

    # ------------------------------------------------------------- cancel ---

    def test_cancel_of_a_queued_job_ends_it_before_any_worker_sees_it(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        job = enqueue(store, inbox, "talk.wav")
        after = store.request_cancel(job.id, reason="moved to cancel/", now=T0 + 1)

        assert after is not None and after.state is JobState.CANCELLED
        assert after.last_error == "moved to cancel/"
        assert after.attempts == 0
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=T0 + 2) is None

    def test_cancel_of_a_running_job_tells_its_worker(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)

        after = store.request_cancel(job.id, reason="whisperd cancel", now=T0 + 1)
        assert after is not None
        assert after.state is JobState.RUNNING and after.cancel_requested

        reply = store.heartbeat(job.id, taken.token, lease_seconds=LEASE, now=T0 + 2)
        assert reply.ok and reply.cancel_requested
        assert store.end_attempt(
            job.id,
            taken.token,
            AttemptEnd(outcome=AttemptOutcome.CANCELLED, error="killed by pool"),
            now=T0 + 3,
        )
        ended = store.get(job.id)
        assert ended is not None
        assert ended.state is JobState.CANCELLED and ended.last_error == "killed by pool"

    def test_failed_attempt_of_a_cancelled_job_is_not_retried(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        store.request_cancel(job.id, reason="user", now=T0 + 1)
        assert (
            store.end_attempt(
                job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.RETRY, error="stopped"), now=T0 + 2
            )
            is JobState.CANCELLED
        )

    def test_cancel_of_an_ended_or_unknown_job_changes_nothing(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        store.end_attempt(job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 1)

        after = store.request_cancel(job.id, reason="too late", now=T0 + 2)
        assert after == store.get(job.id)
        assert after is not None and after.state is JobState.DONE and after.last_error is None
        assert store.request_cancel(job.id + 1000, reason="no such job") is None

    # -------------------------------------------------------------- finds ---

    def test_find_active_by_identity_by_inode_and_by_size_and_mtime(
        self, store: JobStore, inbox: Inbox, tmp_path: Path
    ) -> None:
        spec, identity = inbox.drop("talk.wav", b"the talk")
        job, _ = store.enqueue(spec, identity, max_attempts=3)

        # Renamed into cancel/ on the same file system: same inode.
        cancel_dir = tmp_path / "cancel"
        cancel_dir.mkdir()
        moved = cancel_dir / "talk.wav"
        os.link(inbox.root / "talk.wav", moved)
        assert [j.id for j in store.find_active_by_identity(FileIdentity.of(str(moved)))] == [job.id]

        # Copied with -p (other inode, same size and mtime).
        copied = cancel_dir / "copy.wav"
        shutil.copy2(inbox.root / "talk.wav", copied)
        copy_identity = FileIdentity.of(str(copied))
        assert copy_identity.inode != identity.inode
        assert [j.id for j in store.find_active_by_identity(copy_identity)] == [job.id]

        # A different file matches nothing; neither does another inbox.
        other = cancel_dir / "other.wav"
        other.write_bytes(b"something else entirely")
        assert store.find_active_by_identity(FileIdentity.of(str(other))) == []
        assert store.find_active_by_identity(identity, inbox="elsewhere") == []
        assert [j.id for j in store.find_active_by_identity(identity, inbox=inbox.name)] == [job.id]

    def test_find_active_by_identity_lists_exact_inode_first(self, store: JobStore, inbox: Inbox) -> None:
        _, original = inbox.drop("original.wav", b"same bytes")
        shutil.copy2(inbox.root / "original.wav", inbox.root / "copy.wav")
        copy_spec = inbox.spec("copy.wav")
        copy_job, _ = store.enqueue(copy_spec, FileIdentity.of(str(inbox.root / "copy.wav")), max_attempts=3)
        original_job, _ = store.enqueue(inbox.spec("original.wav"), original, max_attempts=3)

        found = store.find_active_by_identity(original)
        assert [j.id for j in found] == [original_job.id, copy_job.id]

    def test_find_active_by_identity_ignores_ended_jobs(self, store: JobStore, inbox: Inbox) -> None:
        spec, identity = inbox.drop("talk.wav")
        job, _ = store.enqueue(spec, identity, max_attempts=3)
        store.request_cancel(job.id, reason="user")
        assert store.find_active_by_identity(identity) == []

    def test_find_by_source_lists_newest_first(self, store: JobStore, inbox: Inbox) -> None:
        first = enqueue(store, inbox, "talk.wav")
        store.end_attempt(first.id, claim(store).token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 1)
        second = enqueue(store, inbox, "talk.wav", now=T0 + 2)
        enqueue(store, inbox, "other.wav")

        found = store.find_by_source(str(inbox.root / "talk.wav"))
        assert [j.id for j in found] == [second.id, first.id]
        assert store.find_by_source(str(inbox.root / "missing.wav")) == []

    def test_list_jobs_newest_first_with_state_filter_and_limit(self, store: JobStore, inbox: Inbox) -> None:
        jobs = [enqueue(store, inbox, f"clip-{i}.wav") for i in range(4)]
        store.request_cancel(jobs[1].id, reason="user")

        assert [j.id for j in store.list_jobs()] == [j.id for j in reversed(jobs)]
        assert [j.id for j in store.list_jobs(limit=2)] == [jobs[3].id, jobs[2].id]
        assert [j.id for j in store.list_jobs(states=[JobState.CANCELLED])] == [jobs[1].id]
        assert store.list_jobs(states=[JobState.FAILED]) == []

    def test_counts_include_every_state(self, store: JobStore, inbox: Inbox) -> None:
        assert store.counts() == dict.fromkeys(JobState, 0)
        jobs = [enqueue(store, inbox, f"clip-{i}.wav") for i in range(5)]
        done = claim(store)
        store.end_attempt(done.job.id, done.token, AttemptEnd(outcome=AttemptOutcome.DONE))
        claim(store)
        store.request_cancel(jobs[4].id, reason="user")

        assert store.counts() == {
            JobState.QUEUED: 2,
            JobState.RUNNING: 1,
            JobState.DONE: 1,
            JobState.FAILED: 0,
            JobState.CANCELLED: 1,
        }

    def test_running_on_lists_a_workers_jobs(self, store: JobStore, inbox: Inbox) -> None:
        for i in range(3):
            enqueue(store, inbox, f"clip-{i}.wav")
        a = claim(store, "host-a/0")
        b = claim(store, "host-b/0")
        assert [j.id for j in store.running_on("host-a/0")] == [a.job.id]
        assert [j.id for j in store.running_on("host-b/0")] == [b.job.id]
        assert store.running_on("host-c/0") == []

    def test_output_owner_names_the_job_that_wrote_or_is_writing_a_file(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        done_job = enqueue(store, inbox, "talk.mp3")
        done = claim(store)
        # "%" and "_" must be matched literally, not as LIKE wildcards.
        store.end_attempt(
            done_job.id, done.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=("/out/100%_talk.txt",))
        )
        enqueue(store, inbox, "talk.wav")
        running = claim(store)
        assert store.set_outputs(running.job.id, running.token, ["/out/talk.txt", "/out/talk.srt"])
        enqueue(store, inbox, "failed.wav")
        failed = claim(store)
        store.end_attempt(
            failed.job.id,
            failed.token,
            AttemptEnd(outcome=AttemptOutcome.FAILED, outputs=("/out/failed.txt",)),
        )

        assert store.output_owner("/out/100%_talk.txt") == "talk.mp3"
        assert store.output_owner("/out/talk.srt") == "talk.wav"
        assert store.output_owner("/out/100x_talk.txt") is None
        assert store.output_owner("/out/talk") is None
        assert store.output_owner("/out/failed.txt") is None

    def test_outputs_of_jobs_finished_before_v3_still_have_owners(self, store_url: str, inbox: Inbox) -> None:
        # A v2 database, its done job's outputs known only from outputs_json.
        # The row is written as whisperd v2 wrote it: today's store reads
        # columns added since, which a v2 table lacks.
        JobStore.open(store_url, migrations=MIGRATIONS[:2]).close()
        spec, identity = inbox.drop("talk.mp3", b"talk.mp3")
        row = {
            **new_row(spec, identity, T0),
            "state": JobState.DONE.value,
            "max_attempts": 3,
            "outputs_json": '["/out/talk.txt", "/out/talk.srt"]',
        }
        insert = f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + name for name in row)})"
        engine = sa.create_engine(store_url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(insert), row)
        finally:
            engine.dispose()

        upgraded = JobStore.open(store_url)
        try:
            assert upgraded.output_owner("/out/talk.srt") == "talk.mp3"
            assert upgraded.output_owner("/out/talk.vtt") is None
        finally:
            upgraded.close()

    def test_the_realtime_factor_is_the_median_of_done_jobs_of_that_model_engine_and_device(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        assert store.realtime_factor("tiny.en", "openai-whisper", "cpu") is None

        def run(
            name: str, device: str, audio: float, decoding: float | None, *, model: str = "tiny.en"
        ) -> Job:
            spec, identity = inbox.drop(name, name.encode())
            job, _ = store.enqueue(dataclasses.replace(spec, model=model), identity, max_attempts=3, now=T0)
            taken = store.claim(worker="host-a/0", device=device, lease_seconds=LEASE, now=T0)
            assert taken is not None and taken.job.id == job.id
            beat = store.heartbeat(
                job.id,
                taken.token,
                lease_seconds=LEASE,
                audio_seconds=audio,
                decoding_started_at=T0 + 1,
                now=T0 + 2,
            )
            assert beat.ok
            assert store.end_attempt(
                job.id,
                taken.token,
                AttemptEnd(outcome=AttemptOutcome.DONE, decoding_seconds=decoding),
                now=T0 + 3,
            )
            done = store.get(job.id)
            assert done is not None
            return done

        first = run("a.wav", "cpu", audio=10.0, decoding=2.0)
        assert first.decoding_started_at == T0 + 1 and first.decoding_seconds == 2.0
        run("b.wav", "cpu", audio=20.0, decoding=6.0)
        run("c.wav", "cpu", audio=100.0, decoding=40.0)
        run("d.wav", "cuda:0", audio=100.0, decoding=5.0)  # another device
        run("e.wav", "cpu", audio=100.0, decoding=90.0, model="base")  # another model
        run("f.wav", "cpu", audio=100.0, decoding=None)  # finished before decoding was timed
        assert store.realtime_factor("tiny.en", "openai-whisper", "cpu") == pytest.approx(0.3)
        assert store.realtime_factor("tiny.en", "openai-whisper", "cuda:0") == pytest.approx(0.05)
        assert store.realtime_factor("tiny.en", "faster-whisper", "cpu") is None

    def test_a_new_attempt_starts_without_the_last_ones_decoding_time(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        job = enqueue(store, inbox, "talk.wav")
        first = claim(store)
        assert store.heartbeat(
            job.id, first.token, lease_seconds=LEASE, decoding_started_at=T0 + 1, now=T0 + 1
        ).ok
        assert store.get(job.id).decoding_started_at == T0 + 1  # type: ignore[union-attr]
        store.end_attempt(
            job.id,
            first.token,
            AttemptEnd(outcome=AttemptOutcome.RETRY, error="boom", retry_base_seconds=0, retry_max_seconds=0),
            now=T0 + 2,
        )
        second = claim(store, now=T0 + 10)
        again = store.get(second.job.id)
        assert again is not None and again.attempts == 2 and again.decoding_started_at is None
        stale = store.heartbeat(
            job.id, first.token, lease_seconds=LEASE, decoding_started_at=T0 + 11, now=T0 + 11
        )
        assert not stale.ok  # the old attempt's token is fenced off
        assert store.get(job.id).decoding_started_at is None  # type: ignore[union-attr]

    def test_an_attempt_that_ends_before_its_first_beat_still_records_when_decoding_began(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        job = enqueue(store, inbox, "short.wav")
        taken = claim(store)
        end = AttemptEnd(outcome=AttemptOutcome.DONE, decoding_seconds=0.5, decoding_started_at=T0 + 1)
        assert store.end_attempt(job.id, taken.token, end, now=T0 + 2)
        done = store.get(job.id)
        assert done is not None and (done.decoding_started_at, done.decoding_seconds) == (T0 + 1, 0.5)

    def test_model_memory_is_remembered_and_updated(self, store: JobStore) -> None:
        assert store.model_memory("tiny.en", "H100") is None
        store.record_model_memory("tiny.en", "H100", 500_000_000)
        store.record_model_memory("tiny.en", "H100", 6_000_000_000)
        store.record_model_memory("tiny.en", "cpu", 1)
        assert store.model_memory("tiny.en", "H100") == 6_000_000_000
        assert store.model_memory("tiny.en", "cpu") == 1

    # -------------------------------------------------- lifetime / schema ---

    def test_jobs_survive_close_and_open(self, store_url: str, inbox: Inbox) -> None:
        store = JobStore.open(store_url)
        queued = enqueue(store, inbox, "queued.wav")
        enqueue(store, inbox, "running.wav", priority=9)
        taken = claim(store)
        store.close()

        reopened = JobStore.open(store_url)
        try:
            assert reopened.get(queued.id) == queued
            assert reopened.get(taken.job.id) == taken.job
            # The worker's token still holds after the restart of the store.
            assert reopened.heartbeat(taken.job.id, taken.token, lease_seconds=LEASE, now=T0 + 1).ok
        finally:
            reopened.close()

    def test_identity_with_high_bit_inode_round_trips(self, store: JobStore, inbox: Inbox) -> None:
        # overlayfs and NFS hand out inode numbers above 2**63.
        spec = inbox.spec("overlay.wav")
        identity = FileIdentity(
            device=2**64 - 3, inode=2**64 - 1, size=10, mtime_ns=1_700_000_000_123_456_789
        )
        job, _ = store.enqueue(spec, identity, max_attempts=3)
        assert store.get(job.id).identity == identity  # type: ignore[union-attr]
        assert [j.id for j in store.find_active_by_identity(identity)] == [job.id]

    def test_old_database_is_upgraded_in_place(self, store_url: str, inbox: Inbox) -> None:
        store = JobStore.open(store_url)
        jobs = [enqueue(store, inbox, f"clip-{i}.wav") for i in range(3)]
        store.close()

        def add_language_column(conn: sa.Connection) -> None:
            conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN detected_language TEXT"))

        upgraded = JobStore.open(store_url, migrations=(*MIGRATIONS, add_language_column))
        try:
            assert [upgraded.get(j.id) for j in jobs] == jobs
        finally:
            upgraded.close()

        engine = sa.create_engine(store_url)
        try:
            columns = {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
            with engine.connect() as conn:
                version = conn.execute(sa.text("SELECT version FROM whisperd_schema")).scalar()
        finally:
            engine.dispose()
        assert "detected_language" in columns
        assert version == SCHEMA_VERSION + 1

        # This code only knows v1 and must refuse to touch the newer database.
        with pytest.raises(WhisperdError) as refused:
            JobStore.open(store_url)
        assert (
            f"database schema v{SCHEMA_VERSION + 1} is newer than this whisperd (v{SCHEMA_VERSION})"
            in str(refused.value)
        )
        assert "upgrade whisperd" in str(refused.value)

    def test_enqueue_from_many_threads_makes_one_job(self, store: JobStore, inbox: Inbox) -> None:
        spec, identity = inbox.drop("talk.wav")
        results: list[tuple[int, bool]] = []
        errors: list[BaseException] = []
        gate = threading.Barrier(6)

        def enqueue_once() -> None:
            try:
                gate.wait(timeout=30)
                job, created = store.enqueue(spec, identity, max_attempts=3)
                results.append((job.id, created))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=enqueue_once) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert len({job_id for job_id, _ in results}) == 1
        assert sorted(created for _, created in results) == [False] * 5 + [True]


def done_job(store: JobStore, inbox: Inbox, name: str, *, now: float = T0) -> Job:
    """A job of `name` claimed and ended done at now + 5 (its source not moved yet)."""
    job = enqueue(store, inbox, name, now=now)
    taken = claim(store, now=now)
    assert taken.job.id == job.id
    assert store.end_attempt(job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=now + 5)
    return job


def instance_entry(instance: str, token: str) -> InstanceEntry:
    return InstanceEntry(
        instance=instance, token=token, host="host", pid=1, version="0", slots=1, devices="cpu", started_at=T0
    )


class TestEveryVerb:
    """At least one case for each public call of JobStore that the cases above
    do not name (test_every_public_call_has_a_case keeps it so)."""

    def test_every_public_call_has_a_case(self) -> None:
        text = Path(__file__).read_text()
        public = [name for name in dir(JobStore) if not name.startswith("_")]
        assert [name for name in public if f".{name}" not in text] == []

    def test_enqueue_many_queues_a_batch_once_per_file(self, store: JobStore, inbox: Inbox) -> None:
        a, b = inbox.drop("a.wav", b"a"), inbox.drop("b.wav", b"bb")
        answers = store.enqueue_many([a, b, a], max_attempts=3, now=T0)
        assert [created for _job, created in answers] == [True, True, False]
        assert answers[0][0].id == answers[2][0].id
        assert store.counts()[JobState.QUEUED] == 2

    def test_fold_state_counts_keeps_the_counts_and_folds_once(self, store: JobStore, inbox: Inbox) -> None:
        for name in ("a.wav", "b.wav"):
            enqueue(store, inbox, name)
        taken = claim(store)
        store.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE))
        before = store.counts()
        assert store.fold_state_counts() > 0
        assert store.fold_state_counts() == 0
        assert (
            store.counts() == before == {**dict.fromkeys(JobState, 0), JobState.QUEUED: 1, JobState.DONE: 1}
        )

    def test_record_rejected_keeps_a_refused_file_as_a_failed_job(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        spec, identity = inbox.drop("link.wav")
        job = store.record_rejected(spec, identity, reason="a symbolic link", now=T0)
        assert (job.state, job.last_error, job.max_attempts, job.finished_at) == (
            JobState.FAILED,
            "a symbolic link",
            1,
            T0,
        )

    def test_queued_with_inodes_finds_a_batch_of_files(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "a.wav")
        other = enqueue(store, inbox, "b.wav")
        found = store.queued_with_inodes(inbox.name, [(job.identity.device, job.identity.inode)])
        assert [j.id for j in found] == [job.id]
        assert store.queued_with_inodes("elsewhere", [(other.identity.device, other.identity.inode)]) == []
        assert store.queued_with_inodes(inbox.name, []) == []

    def test_a_deferred_file_waits_for_its_path_then_is_queued(self, store: JobStore, inbox: Inbox) -> None:
        first = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        spec, identity = inbox.drop("talk.wav", b"a newer recording")
        store.defer_file(spec, identity, waits_for=first.id, now=T0 + 1)
        assert store.deferred_files([inbox.name]) == []  # its job still runs
        [waiting] = store.deferred_files([inbox.name], ready_only=False)
        assert (waiting.waits_for, waiting.identity, waiting.spec) == (first.id, identity, spec)

        assert store.end_attempt(first.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 5)
        assert store.deferred_files([inbox.name]) == [waiting]
        job, created = store.enqueue_deferred(waiting, identity, max_attempts=3, now=T0 + 6)
        assert created and job.id != first.id and job.identity == identity
        assert store.deferred_files([inbox.name], ready_only=False) == []
        assert not store.forget_deferred(waiting)

    def test_forget_deferred_drops_the_row_of_that_file(self, store: JobStore, inbox: Inbox) -> None:
        first = enqueue(store, inbox, "talk.wav")
        spec, identity = inbox.drop("talk.wav", b"replaced")
        store.defer_file(spec, identity, waits_for=first.id, now=T0 + 1)
        [waiting] = store.deferred_files([inbox.name], ready_only=False)
        assert store.forget_deferred(waiting)
        assert store.deferred_files([inbox.name], ready_only=False) == []

    def test_set_device_and_set_identity_are_fenced(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        changed = FileIdentity(device=job.identity.device, inode=job.identity.inode, size=99, mtime_ns=7)
        assert store.set_device(job.id, taken.token, "cuda:1", now=T0 + 1)
        assert store.set_identity(job.id, taken.token, changed, now=T0 + 1)
        after = store.get(job.id)
        assert after is not None and (after.device, after.identity) == ("cuda:1", changed)
        assert not store.set_device(job.id, "not-the-token", "cpu")
        assert not store.set_identity(job.id, "not-the-token", job.identity)

    def test_output_owner_job_names_the_job_and_its_path(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        taken = claim(store)
        assert store.set_outputs(job.id, taken.token, ["/out/talk.txt"], now=T0 + 1)
        assert store.output_owner_job("/out/talk.txt") == (job.id, "talk.wav")
        assert store.output_owner_job("/out/other.txt") is None

    def test_a_paused_inbox_is_not_claimed_until_resumed(self, store: JobStore, inbox: Inbox) -> None:
        enqueue(store, inbox, "talk.wav")
        assert store.claimable_count([inbox.name]) == 1
        assert store.pause_inbox(inbox.name, now=T0)
        assert not store.pause_inbox(inbox.name, now=T0 + 1)
        assert store.paused_inboxes() == {inbox.name: T0}
        assert store.claimable_count([inbox.name]) == 0
        assert store.claim(worker="host-a/0", device="cpu", lease_seconds=LEASE, now=T0) is None
        assert store.resume_inbox(inbox.name)
        assert not store.resume_inbox(inbox.name)
        assert store.paused_inboxes() == {}
        assert store.claimable_count([inbox.name]) == 1
        assert store.claimable_count([]) == 0

    def test_an_owed_move_retried_then_stuck_then_forgotten(self, store: JobStore, inbox: Inbox) -> None:
        job = done_job(store, inbox, "talk.wav")
        assert [j.id for j in store.undisposed(now=T0 + 100)] == [job.id]
        assert store.undisposed(now=T0 + 100, inboxes=["elsewhere"]) == []

        failures = store.record_move_failure(
            job.id, stuck_reason=None, next_at=T0 + 200, reason="busy", now=T0 + 100
        )
        assert failures == 1 and store.move_attempts(job.id) == 1
        assert [(j.id, n, why) for j, n, why in store.retrying_moves()] == [(job.id, 1, "busy")]
        assert store.undisposed(now=T0 + 150) == []  # its next attempt is not due yet

        assert store.record_move_failure(job.id, stuck_reason="gone", next_at=0.0, now=T0 + 200) == 2
        assert [(j.id, why) for j, why in store.stuck_sources()] == [(job.id, "gone")]
        assert store.source_stuck_reason(job.id) == "gone"
        assert store.retrying_moves() == []
        assert store.undisposed(now=T0 + 300) == []

        assert store.forget_move_failures(job.id) == 1
        assert (store.move_attempts(job.id), store.source_stuck_reason(job.id)) == (0, None)
        assert store.mark_disposed(job.id, "/done/talk.wav", now=T0 + 400)
        assert store.undisposed(now=T0 + 500) == []
        after = store.get(job.id)
        assert after is not None and (after.disposed_to, after.disposed_at) == ("/done/talk.wav", T0 + 400)

    def test_mark_disposed_refuses_an_active_job(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        assert not store.mark_disposed(job.id, "/done/talk.wav")

    def test_requeue_ended_retries_the_same_job_and_keeps_its_history(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        job = enqueue(store, inbox, "talk.wav", max_attempts=1)
        taken = claim(store)
        end = AttemptEnd(outcome=AttemptOutcome.FAILED, error="bad file")
        assert store.end_attempt(job.id, taken.token, end, now=T0 + 5) is JobState.FAILED
        [first] = store.attempts_of(job.id)
        assert (first.number, first.worker, first.device, first.outcome, first.error) == (
            1,
            "host-a/0",
            "cpu",
            "failed",
            "bad file",
        )
        assert first.ended_at == T0 + 5

        with pytest.raises(ValueError, match="only failed or cancelled"):
            store.requeue_ended(job.id, expected=JobState.QUEUED, identity=job.identity, extra_attempts=1)
        again = store.requeue_ended(
            job.id, expected=JobState.FAILED, identity=job.identity, extra_attempts=2, now=T0 + 10
        )
        assert again is not None and (again.id, again.state, again.max_attempts) == (
            job.id,
            JobState.QUEUED,
            3,
        )
        assert (
            store.requeue_ended(job.id, expected=JobState.FAILED, identity=job.identity, extra_attempts=1)
            is None
        )
        claim(store, now=T0 + 10)
        assert [a.number for a in store.attempts_of(job.id)] == [1, 2]

    def test_an_instance_registers_watches_beats_and_leaves(self, store: JobStore, inbox: Inbox) -> None:
        assert store.register_instance(instance_entry("hosta", "tok"), stale_after=LEASE) is None
        assert store.instance_heartbeat("hosta", "tok")
        assert not store.instance_heartbeat("hosta", "another-daemon")
        assert store.set_instance_inboxes("hosta", [(inbox.name, str(inbox.root))], stale_after=LEASE) == []
        [listed] = store.instances()
        assert (listed.instance, listed.token, listed.inboxes) == ("hosta", "tok", (inbox.name,))

        job = enqueue(store, inbox, "talk.wav")
        taken = store.claim(worker="hosta/0", device="cpu", lease_seconds=LEASE, instance="hosta", now=T0)
        assert taken is not None and taken.job.id == job.id
        assert [j.id for j in store.running_of_instance("hosta")] == [job.id]
        assert store.running_of_instance("host") == []  # the prefix is compared exactly

        store.unregister_instance("hosta", "tok")
        assert store.instances() == []

    def test_a_hook_owed_by_a_job_end_is_claimed_once_its_source_moved(
        self, store: JobStore, inbox: Inbox
    ) -> None:
        hooks = {inbox.name: ["on_done"]}
        store.set_hook_subscriptions("hosta", hooks)
        job = done_job(store, inbox, "talk.wav")
        [owed] = store.hook_deliveries_of(job.id)
        assert (owed.kind, owed.state, owed.attempts) == ("on_done", "pending", 0)
        # Its source has not moved, and it was owed after moved_before: it waits.
        assert store.claim_hook_delivery(hooks, lease=LEASE, moved_before=T0, now=T0 + 10) is None

        assert store.mark_disposed(job.id, "/done/talk.wav", now=T0 + 10)
        taken = store.claim_hook_delivery(hooks, lease=LEASE, moved_before=T0, now=T0 + 11)
        assert taken is not None and (taken.id, taken.attempts) == (owed.id, 1)
        assert store.claim_hook_delivery(hooks, lease=LEASE, moved_before=T0, now=T0 + 12) is None  # leased
        assert store.record_hook_outcome(taken, error=None, retry_at=None, now=T0 + 12)
        [made] = store.hook_deliveries_of(job.id)
        assert (made.state, made.delivered_at) == ("delivered", T0 + 12)

    def test_a_hook_no_daemon_has_any_more_is_abandoned(self, store: JobStore, inbox: Inbox) -> None:
        store.set_hook_subscriptions("hosta", {inbox.name: ["on_done"]})
        job = done_job(store, inbox, "talk.wav")
        assert store.abandon_unsubscribed_hooks(now=T0 + 10) == 0
        store.set_hook_subscriptions("hosta", {})
        assert store.abandon_unsubscribed_hooks(now=T0 + 20) == 1
        [given_up] = store.hook_deliveries_of(job.id)
        assert given_up.state == "failed"

    def test_retention_prunes_old_moved_jobs_and_vacuum_runs(self, store: JobStore, inbox: Inbox) -> None:
        old = done_job(store, inbox, "old.wav")
        assert store.mark_disposed(old.id, "/done/old.wav", now=T0 + 6)
        queued = enqueue(store, inbox, "queued.wav")
        later = T0 + 3 * 86400.0
        assert store.prune_finished(keep_days=1, keep_jobs=0, now=later) == 1
        assert store.get(old.id) is None and store.get(queued.id) is not None
        assert store.prune_finished(keep_days=1, keep_jobs=0, now=later) == 0

        sqlite = store.where.startswith("sqlite")
        assert not store.enable_incremental_vacuum()  # a new SQLite file is incremental from the start
        left = store.vacuum_free_pages()
        assert left >= 0 and (sqlite or left == 0)

    def test_health_where_listener_and_failing_fast(self, store: JobStore, store_url: str) -> None:
        assert store.health.up
        assert store.where.startswith(store_url.split(":", maxsplit=1)[0].split("+", maxsplit=1)[0])
        listener = store.listener(lambda _notice: None)  # not started: nothing listens yet
        assert (listener is None) == store.where.startswith("sqlite")
        with store.failing_fast():
            assert store.counts()[JobState.QUEUED] == 0

    def test_open_read_only_reads_what_a_writer_wrote(
        self, store: JobStore, store_url: str, inbox: Inbox
    ) -> None:
        job = enqueue(store, inbox, "talk.wav")
        reader = JobStore.open_read_only(store_url)
        try:
            assert [j.id for j in reader.list_jobs()] == [job.id]
        finally:
            reader.close()


# ------------------------------------------------------- opening, SQLite only ---


def test_sqlite_store_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "whisperd" / "jobs.db"
    JobStore.open(f"sqlite:///{path}").close()

    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM whisperd_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(WhisperdError, match="must be an SQLite file"):
        JobStore.open("sqlite://")


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(WhisperdError, match="unsupported database"):
        JobStore.open("mysql://root@localhost/jobs")


def test_unreachable_database_names_itself(tmp_path: Path) -> None:
    with pytest.raises(WhisperdError, match=r"127\.0\.0\.1:9/nowhere: cannot open the job store") as failed:
        JobStore.open("postgresql://someone:secret@127.0.0.1:9/nowhere")
    assert "secret" not in str(failed.value)


def test_folder_that_cannot_be_created_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(WhisperdError, match="not-a-folder"):
        JobStore.open(f"sqlite:///{blocker}/jobs.db")
