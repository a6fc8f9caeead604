"""The job store's completion-hook record on both backends: what a job's end
owes, a try's lease, outcomes, retention. (The daemon-level behaviour is in
test_hooks.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, Job, JobSpec, JobState
from whisperd.store.job_store import JobStore

T0 = 1_700_000_000.0
HOOKS = {"talks": ("on_done", "on_failed", "webhook")}


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    opened.set_hook_subscriptions("hosta", HOOKS)
    yield opened
    opened.close()


def ended(store: JobStore, tmp_path: Path, name: str, state: JobState, *, inbox: str = "talks") -> Job:
    """A job of `inbox` that ran once and ended in `state`."""
    path = tmp_path / inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(name.encode())
    spec = JobSpec(inbox=inbox, inbox_root=str(path.parent), rel_path=name, model="tiny.en")
    job, _ = store.enqueue(spec, FileIdentity.of(str(path)), max_attempts=1, now=T0)
    taken = store.claim(worker="a/0", device="cpu", lease_seconds=30, now=T0)
    assert taken is not None and taken.job.id == job.id
    if state is JobState.FAILED:
        assert (
            store.end_attempt(
                job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.RETRY, error="bad file"), now=T0 + 1
            )
            is JobState.FAILED
        )
    else:
        assert store.end_attempt(
            job.id, taken.token, AttemptEnd(outcome=AttemptOutcome(state.value)), now=T0 + 1
        )
    store.mark_disposed(job.id, str(path), now=T0 + 1)
    return job


def kinds(store: JobStore, job: Job) -> list[tuple[str, str]]:
    return [(d.kind, d.state) for d in store.hook_deliveries_of(job.id)]


def test_a_jobs_end_owes_exactly_its_inboxes_hooks_for_that_state(store: JobStore, tmp_path: Path) -> None:
    done = ended(store, tmp_path, "a.wav", JobState.DONE)
    failed = ended(store, tmp_path, "b.wav", JobState.FAILED)
    cancelled = ended(store, tmp_path, "c.wav", JobState.CANCELLED)
    quiet = ended(store, tmp_path, "d.wav", JobState.DONE, inbox="no-hooks")
    assert kinds(store, done) == [("on_done", "pending"), ("webhook", "pending")]
    assert kinds(store, failed) == [("on_failed", "pending"), ("webhook", "pending")]
    assert kinds(store, cancelled) == [] and kinds(store, quiet) == []
    # Finishing again with the same token (a lost reply) owes nothing more.
    assert len(store.hook_deliveries_of(done.id)) == 2


def test_a_claimed_delivery_is_leased_then_recorded(store: JobStore, tmp_path: Path) -> None:
    job = ended(store, tmp_path, "a.wav", JobState.DONE)
    only_webhook = {"talks": ("webhook",)}
    first = store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 2)
    assert first is not None and (first.kind, first.attempts) == ("webhook", 1)
    # Leased: nobody else takes it until the lease runs out (a killed runner).
    assert store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 3) is None
    again = store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 63)
    assert again is not None and again.id == first.id and again.attempts == 2
    store.record_hook_outcome(again, error="HTTP 500", retry_at=T0 + 70, now=T0 + 64)
    assert store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 69) is None
    third = store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 70)
    assert third is not None
    store.record_hook_outcome(third, error=None, retry_at=None, now=T0 + 71)
    [webhook] = [d for d in store.hook_deliveries_of(job.id) if d.kind == "webhook"]
    assert (webhook.state, webhook.attempts, webhook.delivered_at, webhook.last_error) == (
        "delivered",
        3,
        T0 + 71,
        None,
    )
    assert store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 999) is None


def test_a_given_up_delivery_is_failed_and_a_retried_job_owes_anew(store: JobStore, tmp_path: Path) -> None:
    job = ended(store, tmp_path, "a.wav", JobState.FAILED)
    hooks = {"talks": ("on_failed",)}
    taken = store.claim_hook_delivery(hooks, lease=60, moved_before=T0, now=T0 + 2)
    assert taken is not None
    store.record_hook_outcome(taken, error="exited with status 1", retry_at=None, now=T0 + 3)
    assert ("on_failed", "failed") in kinds(store, job)
    source = tmp_path / "talks" / "a.wav"
    again = store.requeue_ended(
        job.id, expected=JobState.FAILED, identity=FileIdentity.of(str(source)), extra_attempts=1, now=T0 + 4
    )
    assert again is not None
    claim = store.claim(worker="a/0", device="cpu", lease_seconds=30, now=T0 + 5)
    assert claim is not None
    assert store.end_attempt(job.id, claim.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 6)
    # What the failure still owed would describe a job that runs again: given up, saying why.
    assert kinds(store, job) == [
        ("on_failed", "failed"),
        ("webhook", "failed"),
        ("on_done", "pending"),
        ("webhook", "pending"),
    ]
    forsaken = store.hook_deliveries_of(job.id)[1]
    assert forsaken.last_error is not None and "queued again" in forsaken.last_error


def test_only_configured_inboxes_and_kinds_are_claimed(store: JobStore, tmp_path: Path) -> None:
    ended(store, tmp_path, "a.wav", JobState.DONE)
    assert store.claim_hook_delivery({"talks": ("on_failed",)}, lease=60, moved_before=T0, now=T0 + 2) is None
    assert store.claim_hook_delivery({"other": ("on_done",)}, lease=60, moved_before=T0, now=T0 + 2) is None
    assert store.claim_hook_delivery({}, lease=60, moved_before=T0, now=T0 + 2) is None


def test_a_delivery_waits_for_the_source_move_unless_it_is_stuck(store: JobStore, tmp_path: Path) -> None:
    path = tmp_path / "talks" / "a.wav"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a")
    spec = JobSpec(inbox="talks", inbox_root=str(path.parent), rel_path="a.wav", model="tiny.en")
    store.enqueue(spec, FileIdentity.of(str(path)), max_attempts=1, now=T0)
    taken = store.claim(worker="a/0", device="cpu", lease_seconds=30, now=T0)
    assert taken is not None
    assert store.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=T0 + 1)
    hooks = {"talks": ("on_done",)}
    # Not moved yet: owed since T0 + 1, not before the cut-off.
    assert store.claim_hook_delivery(hooks, lease=60, moved_before=T0, now=T0 + 2) is None
    # Owed longer than the wait (a stuck move): made anyway.
    assert store.claim_hook_delivery(hooks, lease=60, moved_before=T0 + 1, now=T0 + 40) is not None


def test_retention_keeps_a_job_until_its_hooks_are_made_then_takes_them_with_it(
    store: JobStore, tmp_path: Path
) -> None:
    old = ended(store, tmp_path, "a.wav", JobState.DONE)
    later = T0 + 3 * 86400
    # Owed deliveries (a receiver down for days) keep their job: nothing owed is lost.
    assert store.prune_finished(keep_days=1, keep_jobs=0, now=later) == 0
    assert len(store.hook_deliveries_of(old.id)) == 2
    for _ in range(2):
        taken = store.claim_hook_delivery(HOOKS, lease=60, moved_before=later, now=later)
        assert taken is not None and taken.job_id == old.id
        # One delivered, one given up: neither is owed any more.
        store.record_hook_outcome(
            taken, error=None if taken.kind == "webhook" else "x", retry_at=None, now=later
        )
    assert store.prune_finished(keep_days=1, keep_jobs=0, now=later) == 1
    assert store.hook_deliveries_of(old.id) == []
    assert store.get(old.id) is None


def test_a_try_that_outlived_its_lease_does_not_overwrite_the_next_ones_outcome(
    store: JobStore, tmp_path: Path
) -> None:
    job = ended(store, tmp_path, "a.wav", JobState.DONE)
    only_webhook = {"talks": ("webhook",)}
    slow = store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 2)
    assert slow is not None
    # Its lease ran out: another runner (or host) takes it and delivers it.
    quick = store.claim_hook_delivery(only_webhook, lease=60, moved_before=T0, now=T0 + 70)
    assert quick is not None and quick.id == slow.id
    assert store.record_hook_outcome(quick, error=None, retry_at=None, now=T0 + 71)
    # The first try ends late, with an error: it changes nothing.
    assert not store.record_hook_outcome(slow, error="timed out", retry_at=None, now=T0 + 72)
    [webhook] = [d for d in store.hook_deliveries_of(job.id) if d.kind == "webhook"]
    assert (webhook.state, webhook.last_error) == ("delivered", None)


def test_a_shared_inbox_owes_a_hook_that_any_host_has_and_only_once(store: JobStore, tmp_path: Path) -> None:
    # hosta (the fixture) has all three hooks on "talks"; hostb only the webhook; hostc none.
    store.set_hook_subscriptions("hostb", {"talks": ("webhook",)})
    store.set_hook_subscriptions("hostc", {"talks": ()})
    job = ended(store, tmp_path, "a.wav", JobState.DONE)
    assert kinds(store, job) == [("on_done", "pending"), ("webhook", "pending")]


def test_a_hook_no_daemon_has_any_more_ends_failed_instead_of_owed_forever(
    store: JobStore, tmp_path: Path
) -> None:
    store.set_hook_subscriptions("hostb", {"talks": ("webhook",)})
    job = ended(store, tmp_path, "a.wav", JobState.DONE)
    # hosta's reload drops its hooks on "talks"; hostb keeps the webhook.
    store.set_hook_subscriptions("hosta", {})
    assert store.abandon_unsubscribed_hooks(now=T0 + 2) == 1
    assert kinds(store, job) == [("on_done", "failed"), ("webhook", "pending")]
    [dropped] = [d for d in store.hook_deliveries_of(job.id) if d.kind == "on_done"]
    assert dropped.last_error is not None and "no daemon has this hook" in dropped.last_error
    assert store.abandon_unsubscribed_hooks(now=T0 + 3) == 0
