"""Several daemons on one job store: the instance registry and claim affinity,
on SQLite and on the real PostgreSQL (two JobStore handles stand for two hosts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.daemon.views import store_running_jobs
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.values import InstanceEntry

LEASE = 30.0


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[JobStore, JobStore]]:
    """Two handles on one store, as two hosts have."""
    first = JobStore.open(store_url)
    second = JobStore.open(store_url)
    yield first, second
    first.close()
    second.close()


def entry(instance: str, token: str, **changes: object) -> InstanceEntry:
    base = InstanceEntry(
        instance=instance,
        token=token,
        host="host",
        pid=1234,
        version="0",
        slots=1,
        devices="cpu",
        started_at=0.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def dropped(root: Path, inbox: str, rel_path: str) -> tuple[JobSpec, FileIdentity]:
    folder = root / inbox
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / rel_path
    path.write_bytes(rel_path.encode())
    spec = JobSpec(inbox=inbox, inbox_root=str(folder), rel_path=rel_path, model="tiny.en")
    return spec, FileIdentity.of(str(path))


def test_a_live_name_is_refused_to_another_state_folder_and_taken_over_once_stale(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    assert a.register_instance(entry("hosta", "folder-1", pid=11), stale_after=LEASE) is None

    holder = b.register_instance(entry("hosta", "folder-2", pid=22), stale_after=LEASE)
    assert holder is not None and holder.pid == 11 and holder.token == "folder-1"
    assert [(i.instance, i.pid) for i in b.instances()] == [("hosta", 11)]

    # Another name on the same store is no conflict.
    assert b.register_instance(entry("hostb", "folder-2"), stale_after=LEASE) is None
    # Older than the lease (here: any age at all): the name is taken over, and
    # the silent daemon learns it at its next heartbeat.
    assert b.register_instance(entry("hosta", "folder-3", pid=33), stale_after=0.0) is None
    assert not a.instance_heartbeat("hosta", "folder-1")
    assert b.instance_heartbeat("hosta", "folder-3")
    # The dead daemon's unregister leaves the new holder alone.
    a.unregister_instance("hosta", "folder-1")
    assert {i.instance: i.pid for i in a.instances()} == {"hosta": 33, "hostb": 1234}


def test_the_same_state_folder_takes_its_name_back_at_once_after_a_crash(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    assert a.register_instance(entry("hosta", "folder-1", pid=11), stale_after=LEASE) is None
    # No unregister (SIGKILL); the restarted daemon holds the state folder's lock.
    assert b.register_instance(entry("hosta", "folder-1", pid=12), stale_after=LEASE) is None
    assert [(i.instance, i.pid) for i in a.instances()] == [("hosta", 12)]


def test_each_daemon_is_judged_live_by_the_lease_it_registered_with(
    stores: tuple[JobStore, JobStore],
) -> None:
    """Hosts may run with different leases: a heartbeat's age is judged by its
    owner's lease, not by the reader's (status, name take-over, inbox paths)."""
    a, b = stores
    # hosta runs with a long lease; b reads with a zero one (everything is stale by it).
    long_lived = entry("hosta", "folder-1", pid=11, lease_seconds=600.0)
    assert a.register_instance(long_lived, stale_after=600.0) is None
    assert a.set_instance_inboxes("hosta", [("main", "/srv/a/main")], stale_after=600.0) == []

    holder = b.register_instance(entry("hosta", "folder-2", pid=22), stale_after=0.0)
    assert holder is not None and holder.pid == 11 and holder.lease_seconds == 600.0
    (listed,) = b.instances()
    assert listed.is_live(0.0) and listed.lease_seconds == 600.0
    assert b.register_instance(entry("hostb", "folder-2", lease_seconds=0.0), stale_after=0.0) is None
    conflicts = b.set_instance_inboxes("hostb", [("main", "/srv/b/main")], stale_after=0.0)
    assert conflicts == [("main", "hosta", "/srv/a/main")]

    # hostb runs with a zero lease: stale even to a reader with a long one, so
    # its name can be taken over by another state folder.
    by_name = {i.instance: i for i in a.instances()}
    assert not by_name["hostb"].is_live(600.0)
    assert a.register_instance(entry("hostb", "folder-3", pid=33), stale_after=600.0) is None
    assert not b.instance_heartbeat("hostb", "folder-2")


def test_workers_claim_only_jobs_of_inboxes_their_instance_watches(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    a.set_instance_inboxes("hosta", [("shared", "/srv/shared"), ("a-only", "/srv/a")], stale_after=LEASE)
    b.set_instance_inboxes("hostb", [("shared", "/srv/shared"), ("b-only", "/srv/b")], stale_after=LEASE)
    for inbox, name in (("a-only", "a1.wav"), ("b-only", "b1.wav"), ("shared", "s1.wav")):
        a.enqueue(*dropped(tmp_path, inbox, name), max_attempts=3)

    taken_by_b = []
    while (
        claim := b.claim(worker="hostb/cpu-0", device="cpu", lease_seconds=LEASE, instance="hostb")
    ) is not None:
        taken_by_b.append(claim.job.spec.rel_path)
    assert sorted(taken_by_b) == ["b1.wav", "s1.wav"]
    claim = a.claim(worker="hosta/cpu-0", device="cpu", lease_seconds=LEASE, instance="hosta")
    assert claim is not None and claim.job.spec.rel_path == "a1.wav"
    # An instance whose inboxes are not registered claims nothing.
    a.enqueue(*dropped(tmp_path, "a-only", "a2.wav"), max_attempts=3)
    assert a.claim(worker="hostc/cpu-0", device="cpu", lease_seconds=LEASE, instance="hostc") is None

    # A reload that adds an inbox applies to running workers at their next claim.
    b.set_instance_inboxes("hostb", [("shared", "/srv/shared"), ("a-only", "/srv/a")], stale_after=LEASE)
    claim = b.claim(worker="hostb/cpu-0", device="cpu", lease_seconds=LEASE, instance="hostb")
    assert claim is not None and claim.job.spec.rel_path == "a2.wav"


def test_one_inbox_name_for_two_folders_on_live_instances_is_reported_and_not_registered(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    assert a.register_instance(entry("hosta", "folder-1"), stale_after=LEASE) is None
    assert a.set_instance_inboxes("hosta", [("main", "/srv/a/main")], stale_after=LEASE) == []
    assert b.register_instance(entry("hostb", "folder-2"), stale_after=LEASE) is None

    conflicts = b.set_instance_inboxes("hostb", [("main", "/srv/b/main"), ("b", "/srv/b")], stale_after=LEASE)
    assert conflicts == [("main", "hosta", "/srv/a/main")]
    b.enqueue(*dropped(tmp_path, "main", "a.wav"), max_attempts=3)
    assert b.claim(worker="hostb/cpu-0", device="cpu", lease_seconds=LEASE, instance="hostb") is None
    # The same name and path (a shared inbox) is no conflict.
    assert b.set_instance_inboxes("hostb", [("main", "/srv/a/main")], stale_after=LEASE) == []


def test_one_file_enqueued_from_two_hosts_is_one_job(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    spec, identity = dropped(tmp_path, "shared", "talk.wav")
    first, created_a = a.enqueue(spec, identity, max_attempts=3)
    second, created_b = b.enqueue_many([(spec, identity)], max_attempts=3)[0]
    assert (created_a, created_b) == (True, False)
    assert second.id == first.id
    assert [j.state for j in a.list_jobs()] == [JobState.QUEUED]


def test_owed_source_moves_are_listed_only_for_the_inboxes_asked_for(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, _b = stores
    for inbox in ("a-only", "b-only"):
        a.enqueue(*dropped(tmp_path, inbox, "x.wav"), max_attempts=3)
        claim = a.claim(worker="w/0", device="cpu", lease_seconds=LEASE, inboxes=[inbox])
        assert claim is not None
        assert a.end_attempt(claim.job.id, claim.token, AttemptEnd(outcome=AttemptOutcome.DONE))
    assert [j.spec.inbox for j in a.undisposed(inboxes=["a-only"])] == ["a-only"]
    assert sorted(j.spec.inbox for j in a.undisposed()) == ["a-only", "b-only"]


def test_each_instance_exports_only_the_jobs_its_own_workers_run(
    stores: tuple[JobStore, JobStore], tmp_path: Path
) -> None:
    a, b = stores
    for n, instance in enumerate(("hosta", "hostb", "hostb")):
        a.enqueue(*dropped(tmp_path, "shared", f"{n}.wav"), max_attempts=3)
        claim = a.claim(worker=f"{instance}/cpu-{n}", device=f"cuda:{n}", lease_seconds=LEASE)
        assert claim is not None
    a_view = store_running_jobs(a, instance="hosta")
    b_view = store_running_jobs(b, instance="hostb")
    assert [v.device for v in a_view] == ["cuda:0"]
    assert sorted(v.device for v in b_view) == ["cuda:1", "cuda:2"]
    # The table-wide view (a single daemon, the status command) has all three.
    assert len(store_running_jobs(a)) == len(a_view) + len(b_view)
