"""Files that settle together are queued together: the watcher hands them over
in one call (on_settled_many) and the job store queues them in one
transaction (enqueue_many), each file exactly once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.jobs import FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.watch.rules import WatchSpec
from whisperd.watch.watcher import Watcher

SETTLE = 0.5


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


def dropped(inbox: Path, name: str) -> tuple[JobSpec, FileIdentity]:
    """A real file in the inbox, with the spec and identity the daemon would give it."""
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    path.write_bytes(b"RIFF" + name.encode())
    spec = JobSpec(
        inbox="talks",
        inbox_root=str(inbox),
        rel_path=name,
        model="tiny.en",
        output_dir=str(inbox.parent / "output"),
        done_dir=str(inbox.parent / "done"),
        failed_dir=str(inbox.parent / "failed"),
    )
    return spec, FileIdentity.of(str(path))


def test_each_file_of_a_batch_becomes_one_queued_job(store: JobStore, tmp_path: Path) -> None:
    files = [dropped(tmp_path / "inbox", f"talk{n}.wav") for n in range(5)]

    answers = store.enqueue_many([*files, files[2]], max_attempts=3)

    assert [created for _job, created in answers] == [True] * 5 + [False]
    assert answers[5][0].id == answers[2][0].id  # listed twice, queued once
    queued = store.list_jobs(states=[JobState.QUEUED])
    assert sorted(job.spec.rel_path for job in queued) == [f"talk{n}.wav" for n in range(5)]
    assert {job.max_attempts for job in queued} == {3}


def test_a_batch_leaves_files_that_already_have_an_active_job_alone(store: JobStore, tmp_path: Path) -> None:
    first = dropped(tmp_path / "inbox", "first.wav")
    existing, _ = store.enqueue(*first, max_attempts=3)
    second = dropped(tmp_path / "inbox", "second.wav")

    answers = store.enqueue_many([first, second], max_attempts=3)

    assert [(job.spec.rel_path, created) for job, created in answers] == [
        ("first.wav", False),
        ("second.wav", True),
    ]
    assert answers[0][0].id == existing.id
    assert store.counts()[JobState.QUEUED] == 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stepped_watcher(
    inbox: Path, calls: list[list[str]], *, fail_first: bool = False
) -> tuple[Watcher, Clock]:
    """A watcher driven by hand (no observer, no thread) with a fake clock."""
    clock = Clock()
    cancel = inbox.parent / "cancel"
    inbox.mkdir(parents=True, exist_ok=True)
    cancel.mkdir(parents=True, exist_ok=True)

    def on_settled_many(_spec: WatchSpec, files: list[tuple[str, FileIdentity]]) -> None:
        calls.append(sorted(os.path.basename(path) for path, _identity in files))
        if fail_first and len(calls) == 1:
            raise RuntimeError("job store unreachable")

    def refuse_single(*_args: object) -> None:
        raise AssertionError("with on_settled_many, inbox files never go one by one")

    watcher = Watcher(
        [WatchSpec(name="talks", root=str(inbox), cancel_dir=str(cancel))],
        settle_seconds=SETTLE,
        rescan_seconds=0,
        on_settled=refuse_single,
        on_cancel=lambda *_args: None,
        on_rejected=lambda *_args: None,
        clock=clock,
        on_settled_many=on_settled_many,
    )
    watcher.start(observe=False, run_loop=False)
    return watcher, clock


def settle(watcher: Watcher, clock: Clock) -> None:
    watcher.step()  # first look
    clock.now += SETTLE + 0.01
    watcher.step()  # unchanged for settle_seconds: handed over


def test_files_that_settle_together_arrive_in_one_call(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    calls: list[list[str]] = []
    watcher, clock = stepped_watcher(inbox, calls)
    try:
        names = [f"talk{n:02d}.wav" for n in range(20)]
        for name in names:
            (inbox / name).write_bytes(b"audio")
        watcher.rescan()
        settle(watcher, clock)
        clock.now += SETTLE + 0.01
        watcher.step()
        watcher.rescan()
        settle(watcher, clock)
    finally:
        watcher.stop()

    assert calls == [names]  # once, all together, and never again


def test_a_batch_whose_callback_failed_is_offered_again_by_the_next_rescan(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    calls: list[list[str]] = []
    watcher, clock = stepped_watcher(inbox, calls, fail_first=True)
    try:
        for name in ("a.wav", "b.wav"):
            (inbox / name).write_bytes(b"audio")
        watcher.rescan()
        settle(watcher, clock)
        watcher.rescan()
        settle(watcher, clock)
    finally:
        watcher.stop()

    assert calls == [["a.wav", "b.wav"], ["a.wav", "b.wav"]]
