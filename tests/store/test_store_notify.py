"""The store's wake-ups on the real PostgreSQL: a job queued or a cancel asked
for through one handle (one host) is announced to a listener of another,
once committed; SQLite has no listener (the poll serves it)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobSpec, JobState
from whisperd.store import notify as store_notify
from whisperd.store.job_store import JobStore
from whisperd.store.notify import StoreListener, StoreNotice

LEASE = 30.0
# Generous waits for a notice that should come (a wait, not a bound on its speed).
ARRIVES = 30.0


def dropped(root: Path, inbox: str, rel_path: str) -> tuple[JobSpec, FileIdentity]:
    folder = root / inbox
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / rel_path
    path.write_bytes(rel_path.encode())
    spec = JobSpec(inbox=inbox, inbox_root=str(folder), rel_path=rel_path, model="tiny.en")
    return spec, FileIdentity.of(str(path))


@pytest.fixture
def listened(
    postgres_schema_url: str,
) -> Iterator[tuple[JobStore, queue.SimpleQueue[StoreNotice]]]:
    """A store handle (host A) and the notices host B's listener hears."""
    writer = JobStore.open(postgres_schema_url)
    reader = JobStore.open(postgres_schema_url)
    heard: queue.SimpleQueue[StoreNotice] = queue.SimpleQueue()
    listener = reader.listener(heard.put)
    assert isinstance(listener, StoreListener)
    listener.start()
    try:
        assert listener.wait_listening(ARRIVES)
        yield writer, heard
    finally:
        listener.stop()
        writer.close()
        reader.close()


def drain(heard: queue.SimpleQueue[StoreNotice]) -> list[StoreNotice]:
    found = []
    while not heard.empty():
        found.append(heard.get_nowait())
    return found


@pytest.mark.postgres
def test_a_queued_job_and_a_cancel_are_announced_to_another_host(
    listened: tuple[JobStore, queue.SimpleQueue[StoreNotice]], tmp_path: Path
) -> None:
    store, heard = listened
    job, created = store.enqueue(*dropped(tmp_path, "shared", "a.wav"), max_attempts=3)
    assert created
    assert heard.get(timeout=ARRIVES) == StoreNotice(kind=store_notify.QUEUED, inbox="shared")

    # A batch of files of one inbox is one notice; a file already queued is none.
    items = [dropped(tmp_path, "shared", f"{n}.wav") for n in range(3)]
    store.enqueue_many(items, max_attempts=3)
    assert heard.get(timeout=ARRIVES) == StoreNotice(kind=store_notify.QUEUED, inbox="shared")
    store.enqueue(*dropped(tmp_path, "shared", "a.wav"), max_attempts=3)

    claim = store.claim(worker="hostb/cpu-0", device="cpu", lease_seconds=LEASE)
    assert claim is not None and claim.job.id == job.id
    after = store.request_cancel(job.id, reason="cancelled with whisperd cancel")
    assert after is not None and after.state is JobState.RUNNING and after.cancel_requested
    cancel = StoreNotice(kind=store_notify.CANCEL, inbox="shared", job_id=job.id)
    assert heard.get(timeout=ARRIVES) == cancel
    # Nothing else was announced: not the second enqueue of a.wav.
    assert drain(heard) == []


def test_sqlite_has_no_listener_and_still_queues(tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        assert store.listener(lambda _notice: None) is None
        _job, created = store.enqueue(*dropped(tmp_path, "main", "a.wav"), max_attempts=3)
        assert created
    finally:
        store.close()


def test_a_payload_of_another_version_is_skipped() -> None:
    assert store_notify.parse("not json") is None
    assert store_notify.parse('{"kind": "queued"}') is None
    assert store_notify.parse('{"kind": "queued", "inbox": "x", "job_id": 0}') == StoreNotice(
        kind="queued", inbox="x"
    )


@pytest.mark.postgres
def test_a_job_handed_back_at_shutdown_is_announced_again(
    listened: tuple[JobStore, queue.SimpleQueue[StoreNotice]], tmp_path: Path
) -> None:
    store, heard = listened
    job, _ = store.enqueue(*dropped(tmp_path, "shared", "a.wav"), max_attempts=3)
    assert heard.get(timeout=ARRIVES) == StoreNotice(kind=store_notify.QUEUED, inbox="shared")
    claim = store.claim(worker="hosta/cpu-0", device="cpu", lease_seconds=LEASE)
    assert claim is not None and claim.job.id == job.id
    # Host A stops and gives the job back: another host's idle worker hears of it.
    assert store.end_attempt(
        job.id,
        claim.token,
        AttemptEnd(outcome=AttemptOutcome.RELEASED, error="whisperd stopped while the job ran"),
    )
    assert heard.get(timeout=ARRIVES) == StoreNotice(kind=store_notify.QUEUED, inbox="shared")
    assert drain(heard) == []
