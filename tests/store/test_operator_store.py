"""The job store's operator features on SQLite and the real PostgreSQL:
retention, the attempt history, retry of an ended job, paused inboxes;
and, on an SQLite file, that pruning really shrinks the file."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.test_job_store import LEASE, T0, Inbox, claim, enqueue
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobState
from whisperd.store.job_store import JobStore

DAY = 86400.0


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    return Inbox(tmp_path / "inbox")


def finish_done(store: JobStore, inbox: Inbox, name: str, *, at: float, disposed: bool = True) -> int:
    """A job that ran and ended done at `at`, its source moved (unless not disposed)."""
    job = enqueue(store, inbox, name, now=at)
    taken = claim(store, now=at)
    assert taken.job.id == job.id
    out = str(inbox.root / f"{name}.txt")
    assert store.end_attempt(
        job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=(out,)), now=at + 1
    )
    if disposed:
        assert store.mark_disposed(job.id, str(inbox.root / "done" / name), now=at + 1)
    return job.id


class TestRetention:
    def test_prunes_old_and_excess_finished_jobs_only(self, store: JobStore, inbox: Inbox) -> None:
        now = T0 + 100 * DAY
        old = [finish_done(store, inbox, f"old{i}.wav", at=T0 + i) for i in range(5)]
        owed = finish_done(store, inbox, "owed.wav", at=T0 + 10, disposed=False)
        recent = [finish_done(store, inbox, f"new{i}.wav", at=now - 3600 + i) for i in range(3)]
        queued = enqueue(store, inbox, "waiting.wav", now=T0).id  # old, but queued
        running = enqueue(store, inbox, "busy.wav", now=T0).id
        busy = store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=T0)
        assert busy is not None and busy.job.id in (queued, running)

        # Small batches: two passes for five old jobs.
        assert store.prune_finished(keep_days=30, keep_jobs=0, batch=3, now=now) == 3
        assert store.prune_finished(keep_days=30, keep_jobs=0, batch=3, now=now) == 2
        assert store.prune_finished(keep_days=30, keep_jobs=0, batch=3, now=now) == 0

        left = {job.id for job in store.list_jobs(limit=100)}
        assert not left & set(old)
        assert {owed, queued, running, *recent} <= left
        assert store.output_owner_job(str(inbox.root / "old0.wav.txt")) is None
        assert store.attempts_of(old[0]) == []

        # The count limit keeps the newest finished jobs, never the active ones.
        assert store.prune_finished(keep_days=0, keep_jobs=2, batch=100, now=now) == 1
        left = {job.id for job in store.list_jobs(limit=100)}
        assert left == {owed, queued, running, recent[1], recent[2]}

    def test_nothing_is_pruned_without_a_limit(self, store: JobStore, inbox: Inbox) -> None:
        finish_done(store, inbox, "a.wav", at=T0)
        assert store.prune_finished(keep_days=0, keep_jobs=0, now=T0 + 1000 * DAY) == 0
        assert len(store.list_jobs()) == 1


class TestHistoryRetryPause:
    def test_every_attempt_is_recorded_with_its_end(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav", max_attempts=3)
        first = claim(store, "host/1/cpu0")
        after = store.end_attempt(
            job.id,
            first.token,
            AttemptEnd(outcome=AttemptOutcome.RETRY, error="decoder crashed", retry_base_seconds=0),
            now=T0 + 5,
        )
        assert after is JobState.QUEUED
        second = claim(store, "host/2/cpu0", now=T0 + 10)
        assert [a.outcome for a in store.attempts_of(job.id)] == ["queued", None]
        assert store.end_attempt(job.id, second.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 20)

        history = store.attempts_of(job.id)
        assert [(a.number, a.worker, a.outcome, a.error) for a in history] == [
            (1, "host/1/cpu0", "queued", "decoder crashed"),
            (2, "host/2/cpu0", "done", None),
        ]
        assert history[1].started_at == T0 + 10 and history[1].ended_at == T0 + 20

    def test_a_failed_job_is_queued_again_as_the_same_job(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav", max_attempts=1)
        taken = claim(store)
        assert (
            store.end_attempt(
                job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.RETRY, error="not media"), now=T0 + 1
            )
            is JobState.FAILED
        )
        store.mark_disposed(job.id, "/somewhere/failed/talk.wav", now=T0 + 1)
        (inbox.root / "talk.wav").write_bytes(b"fixed content, another size")
        fixed = FileIdentity.of(str(inbox.root / "talk.wav"))

        # Only from the state the caller saw.
        assert (
            store.requeue_ended(job.id, expected=JobState.CANCELLED, identity=fixed, extra_attempts=2) is None
        )
        again = store.requeue_ended(
            job.id, expected=JobState.FAILED, identity=fixed, extra_attempts=2, now=T0 + 2
        )
        assert again is not None
        assert (again.id, again.state, again.attempts, again.max_attempts) == (job.id, JobState.QUEUED, 1, 3)
        assert again.identity == fixed and again.disposed_at is None and again.finished_at is None

        second = claim(store, now=T0 + 3)
        assert second.job.id == job.id and second.job.attempts == 2
        assert [a.number for a in store.attempts_of(job.id)] == [1, 2]

    def test_retry_refused_while_another_job_holds_the_path(self, store: JobStore, inbox: Inbox) -> None:
        job = enqueue(store, inbox, "talk.wav")
        store.request_cancel(job.id, reason="test", now=T0 + 1)
        newer = enqueue(store, inbox, "talk.wav", now=T0 + 2)  # dropped again meanwhile
        identity = FileIdentity.of(str(inbox.root / "talk.wav"))
        assert (
            store.requeue_ended(job.id, expected=JobState.CANCELLED, identity=identity, extra_attempts=1)
            is None
        )
        assert store.get(job.id).state is JobState.CANCELLED  # type: ignore[union-attr]
        assert store.get(newer.id).state is JobState.QUEUED  # type: ignore[union-attr]

    def test_paused_inbox_is_not_claimed_until_resumed(self, store: JobStore, tmp_path: Path) -> None:
        talks, music = Inbox(tmp_path / "talks", "talks"), Inbox(tmp_path / "music", "music")
        held = enqueue(store, talks, "a.wav", priority=5)
        other = enqueue(store, music, "b.wav")
        assert store.pause_inbox("talks", now=T0) is True
        assert store.pause_inbox("talks", now=T0 + 1) is False
        assert store.paused_inboxes() == {"talks": T0}

        assert claim(store).job.id == other.id  # the higher priority waits
        assert store.claim(worker="w", device="cpu", lease_seconds=LEASE, now=T0) is None

        assert store.resume_inbox("talks") is True
        assert store.resume_inbox("talks") is False
        assert claim(store).job.id == held.id


class TestSqliteFile:
    def test_pruning_shrinks_the_file(self, tmp_path: Path, inbox: Inbox) -> None:
        path = tmp_path / "jobs.db"
        store = JobStore.open(f"sqlite:///{path}")
        try:
            big = "x" * 4000  # a long error text per job makes the rows fill pages
            specs = [inbox.drop(f"f{i}.wav", str(i).encode()) for i in range(600)]
            store.enqueue_many(specs, max_attempts=1, now=T0)
            for job in store.list_jobs(states=[JobState.QUEUED], limit=2000):
                store.request_cancel(job.id, reason=big, now=T0)
            for job in store.list_jobs(limit=2000):
                store.mark_disposed(job.id, "", now=T0)
            checkpoint(path)
            before = os.path.getsize(path)

            while store.prune_finished(keep_days=1, keep_jobs=0, batch=500, now=T0 + 2 * DAY):
                store.vacuum_free_pages(100_000)
            after = os.path.getsize(path)
        finally:
            store.close()
        assert store_is_empty(path)
        assert after < before / 5, (before, after)

    def test_an_older_file_is_switched_to_incremental_vacuum(self, tmp_path: Path) -> None:
        path = tmp_path / "jobs.db"
        made = sqlite3.connect(path)  # a file whose header was written without auto_vacuum
        made.execute("PRAGMA journal_mode=WAL")
        made.execute("CREATE TABLE notes (text TEXT)")
        made.close()
        store = JobStore.open(f"sqlite:///{path}")
        try:
            assert auto_vacuum(path) == 0
            assert store.enable_incremental_vacuum() is True
            assert auto_vacuum(path) == 2
            assert store.enable_incremental_vacuum() is False
        finally:
            store.close()

    def test_a_new_file_is_incremental_from_the_start(self, tmp_path: Path) -> None:
        path = tmp_path / "jobs.db"
        JobStore.open(f"sqlite:///{path}").close()
        assert auto_vacuum(path) == 2


def auto_vacuum(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    finally:
        conn.close()


def checkpoint(path: Path) -> None:
    """Copy the WAL into the main file, so its size says how big the store is."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()


def store_is_empty(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0]) == 0
    finally:
        conn.close()


def test_a_run_handed_back_at_shutdown_is_shown_as_not_counted(store: JobStore, inbox: Inbox) -> None:
    from whisperd.store.report import show_document

    job = enqueue(store, inbox, "talk.wav", now=T0)
    first = claim(store, "host-a/0", now=T0)
    assert store.end_attempt(
        job.id,
        first.token,
        AttemptEnd(outcome=AttemptOutcome.RELEASED, error="whisperd stopped while the job ran"),
        now=T0 + 5,
    )
    second = claim(store, "host-b/0", now=T0 + 6)
    assert store.end_attempt(job.id, second.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 9)
    ended = store.get(job.id)
    assert ended is not None and ended.attempts == 1
    history = show_document(ended, store.attempts_of(job.id), None, [])["history"]
    assert [(h["attempt"], h["worker"], h["outcome"], h["counted"]) for h in history] == [
        (1, "host-a/0", "queued", False),
        (1, "host-b/0", "done", True),
    ]


def test_a_job_shorter_than_a_heartbeat_still_records_its_audio_length(store: JobStore, inbox: Inbox) -> None:
    job = enqueue(store, inbox, "short.wav", now=T0)
    taken = claim(store, now=T0)
    # No heartbeat came before it ended: finish() itself records the length.
    assert store.end_attempt(
        job.id,
        taken.token,
        AttemptEnd(outcome=AttemptOutcome.DONE, decoding_seconds=0.3, audio_seconds=3.2),
        now=T0 + 1,
    )
    done = store.get(job.id)
    assert done is not None and done.audio_seconds == 3.2
    # ... which the next jobs' ETA learns from (seconds of work per second of audio).
    rate = store.realtime_factor(done.spec.model, done.spec.options.engine, "cpu")
    assert rate is not None and abs(rate - 0.3 / 3.2) < 1e-9
