"""Jobs per state as `whisperd status` and the `whisperd_jobs` gauge read them:
kept by the database itself (schema v13: triggers append deltas, folds move
them into totals) instead of counted with a scan of the whole table. Checked
against the jobs themselves after every kind of move, with and without
folds in between, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.schema import MIGRATIONS

LEASE = 30.0
T0 = 1_000_000.0


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


def dropped(root: Path, names: list[str]) -> list[tuple[JobSpec, FileIdentity]]:
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for name in names:
        path = root / name
        path.write_bytes(name.encode())
        spec = JobSpec(inbox="talks", inbox_root=str(root), rel_path=name, model="tiny.en")
        items.append((spec, FileIdentity.of(str(path))))
    return items


def truth(store: JobStore) -> dict[JobState, int]:
    """The states of the jobs themselves, every state listed."""
    seen = Counter(job.state for job in store.list_jobs(limit=1_000_000))
    return {state: seen.get(state, 0) for state in JobState}


def test_counts_follow_every_move_of_a_job(store: JobStore, tmp_path: Path) -> None:
    def check() -> None:
        assert store.counts() == truth(store)

    items = dropped(tmp_path / "talks", [f"clip-{i}.wav" for i in range(8)])
    store.enqueue_many(items, max_attempts=2, now=T0)
    check()
    claims = [store.claim(worker=f"h/{i}", device="cpu", lease_seconds=LEASE, now=T0) for i in range(5)]
    assert all(c is not None for c in claims)
    check()
    first, second, third, fourth, _silent = (c for c in claims if c is not None)
    store.end_attempt(first.job.id, first.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0)
    store.end_attempt(
        second.job.id, second.token, AttemptEnd(outcome=AttemptOutcome.FAILED, error="bad"), now=T0
    )
    store.end_attempt(
        third.job.id, third.token, AttemptEnd(outcome=AttemptOutcome.RETRY, error="again"), now=T0
    )
    check()
    assert store.fold_state_counts() > 0
    check()
    store.request_cancel(fourth.job.id, reason="user", now=T0)
    queued = store.list_jobs(states=[JobState.QUEUED])
    store.request_cancel(queued[0].id, reason="user", now=T0)
    check()
    # fifth's worker went silent: its lease runs out.
    store.reclaim_stale(now=T0 + 10 * LEASE)
    check()
    assert store.counts()[JobState.DONE] == 1
    store.fold_state_counts()
    assert store.fold_state_counts() == 0  # nothing left to fold
    check()


def test_pruned_jobs_leave_the_counts(store: JobStore, tmp_path: Path) -> None:
    items = dropped(tmp_path / "talks", [f"old-{i}.wav" for i in range(4)])
    store.enqueue_many(items, max_attempts=1, now=T0)
    while (taken := store.claim(worker="h/0", device="cpu", lease_seconds=LEASE, now=T0)) is not None:
        store.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0)
        store.mark_disposed(taken.job.id, "done", now=T0)
    store.fold_state_counts()
    assert store.counts()[JobState.DONE] == 4
    assert store.prune_finished(keep_days=1.0, keep_jobs=0, now=T0 + 10 * 86400) == 4
    assert store.counts() == dict.fromkeys(JobState, 0) == truth(store)


def test_a_store_with_jobs_upgraded_to_v13_counts_the_jobs_it_had(store_url: str, tmp_path: Path) -> None:
    older = JobStore.open(store_url, migrations=MIGRATIONS[:12])
    older.enqueue_many(dropped(tmp_path / "talks", ["a.wav", "b.wav", "c.wav"]), max_attempts=1, now=T0)
    taken = older.claim(worker="h/0", device="cpu", lease_seconds=LEASE, now=T0)
    assert taken is not None
    older.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0)
    older.close()

    upgraded = JobStore.open(store_url)
    try:
        assert upgraded.counts() == {**dict.fromkeys(JobState, 0), JobState.QUEUED: 2, JobState.DONE: 1}
    finally:
        upgraded.close()


@pytest.mark.postgres
def test_hosts_folding_while_others_claim_never_count_a_job_twice(
    postgres_database_url: str, tmp_path: Path
) -> None:
    """Three hosts claim and finish; two of them fold as they go."""
    stores = [JobStore.open(postgres_database_url) for _ in range(3)]
    try:
        stores[0].enqueue_many(dropped(tmp_path / "talks", [f"c{i}.wav" for i in range(60)]), max_attempts=1)
        errors: list[BaseException] = []

        def host(index: int) -> None:
            store = stores[index]
            try:
                while (
                    taken := store.claim(worker=f"h{index}/0", device="cpu", lease_seconds=LEASE)
                ) is not None:
                    store.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE))
                    if index < 2:
                        store.fold_state_counts()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=host, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert stores[2].counts() == {**dict.fromkeys(JobState, 0), JobState.DONE: 60} == truth(stores[2])
    finally:
        for store in stores:
            store.close()
