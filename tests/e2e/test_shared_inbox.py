"""One inbox folder watched by several hosts: a host that saw a file before
another host's job moved it out, and queues it after, gets no job for a
file that is gone; the same file put back into the inbox is a new job.
On SQLite and the real PostgreSQL (the store), and with real daemons."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import TERMINAL_STATES, AttemptEnd, AttemptOutcome, FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore

DaemonFactory = Callable[..., DaemonUnderTest]
LEASE = 30.0


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[JobStore, JobStore]]:
    """Two handles on one store, as two hosts have."""
    first = JobStore.open(store_url)
    second = JobStore.open(store_url)
    yield first, second
    first.close()
    second.close()


def ran_and_moved_out(store: JobStore, tmp_path: Path) -> tuple[JobSpec, FileIdentity, int]:
    """Host A queues talk.wav, runs it and moves it to done/."""
    folder = tmp_path / "shared"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "talk.wav").write_bytes(b"talk")
    spec = JobSpec(inbox="shared", inbox_root=str(folder), rel_path="talk.wav", model="tiny.en")
    identity = FileIdentity.of(spec.source)
    job, created = store.enqueue(spec, identity, max_attempts=3)
    assert created
    claim = store.claim(worker="hosta/cpu-0", device="cpu", lease_seconds=LEASE)
    assert claim is not None and store.end_attempt(
        claim.job.id, claim.token, AttemptEnd(outcome=AttemptOutcome.DONE)
    )
    done = tmp_path / "done"
    done.mkdir()
    os.rename(spec.source, done / "talk.wav")
    assert store.mark_disposed(job.id, str(done / "talk.wav"))
    return spec, identity, job.id


def test_a_late_sighting_of_a_file_already_run_and_moved_out_is_not_queued(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    spec, identity, first_id = ran_and_moved_out(a, tmp_path)

    # Host B looked at talk.wav before the move and queues it now.
    [(job, created)] = b.enqueue_many([(spec, identity)], max_attempts=3, skip_moved_twins=True)
    assert (job.id, created, job.state) == (first_id, False, JobState.DONE)
    assert [j.id for j in b.list_jobs()] == [first_id]

    # Another file under that name (another identity) is a new job.
    other = FileIdentity(device=identity.device, inode=identity.inode + 1, size=9, mtime_ns=1)
    [(new, created)] = b.enqueue_many([(spec, other)], max_attempts=3, skip_moved_twins=True)
    assert created and new.id != first_id and new.state is JobState.QUEUED


def test_the_same_file_put_back_is_queued_when_the_caller_asks_without_the_twin_check(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    spec, identity, first_id = ran_and_moved_out(a, tmp_path)
    job, created = b.enqueue(spec, identity, max_attempts=3)
    assert created and job.id != first_id


@pytest.mark.slow
def test_a_file_moved_back_from_done_into_the_inbox_is_transcribed_again(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory("again")
    daemon.start()
    daemon.drop(speech("The quick brown fox jumps over the lazy dog.", "fox"), "fox.wav")
    daemon.wait_for(
        lambda: (j := daemon.job_for("fox.wav")) is not None and j.disposed_to is not None,
        timeout=120.0,
        what="fox.wav done and moved",
    )
    first = daemon.job_for("fox.wav")
    assert first is not None and first.state is JobState.DONE and first.disposed_to is not None

    # Moved back: the same inode, size and mtime as the file its job moved out.
    os.rename(first.disposed_to, daemon.inbox / "fox.wav")

    def second_done() -> bool:
        jobs = [j for j in daemon.jobs() if j.spec.rel_path == "fox.wav"]
        return len(jobs) == 2 and all(j.state is JobState.DONE and j.disposed_to for j in jobs)

    daemon.wait_for(second_done, timeout=120.0, what="a second job for fox.wav done")
    assert daemon.events("job.seen_late") == []
    assert daemon.stop() == 0


@pytest.mark.slow
@pytest.mark.postgres
def test_two_hosts_watching_one_folder_give_each_file_exactly_one_done_job(
    postgres_database_url: str, daemon_factory: DaemonFactory, speech: SpeechFactory, tmp_path: Path
) -> None:
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared")
    url = postgres_database_url
    # Frequent rescans on both: each host keeps re-reading the folder the other empties.
    daemons = [
        daemon_factory(
            name,
            inboxes=[shared],
            database_url=url,
            daemon={"instance": name, "rescan_seconds": 0.2, "settle_seconds": 0.2},
        )
        for name in ("hosta", "hostb")
    ]
    for daemon in daemons:
        daemon.start()
    phrases = ("Good morning everyone.", "It is raining again.", "Send the report on Friday.")
    names = [f"clip{n}.wav" for n in range(6)]
    inbox = Path(str(shared["path"]))
    for n, name in enumerate(names):
        clip = speech(phrases[n % len(phrases)], f"clip{n}")
        temp = inbox / f".{name}.part"
        temp.write_bytes(clip.read_bytes())
        temp.rename(inbox / name)

    a = daemons[0]

    def all_ended() -> bool:
        jobs = a.jobs()
        return {j.spec.rel_path for j in jobs} == set(names) and all(
            j.state in TERMINAL_STATES and j.disposed_at for j in jobs
        )

    a.wait_for(all_ended, timeout=300.0, what="every clip ended and moved")
    # Rescans of both hosts after the last move find nothing more to queue.
    for daemon in daemons:
        daemon.wait_for_rescans(2)
    jobs = a.jobs()
    assert sorted(j.spec.rel_path for j in jobs) == sorted(names), [(j.spec.rel_path, j.state) for j in jobs]
    assert {j.state for j in jobs} == {JobState.DONE}
    assert sorted(os.listdir(shared["done"])) == sorted(names)
    for daemon in daemons:
        assert daemon.events("job.failed") == [], daemon.log_text()
        assert daemon.stop() == 0
