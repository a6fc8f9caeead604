"""Leases are set and judged by the database's clock (store contract, on
SQLite and PostgreSQL): a step of this host's wall clock neither reclaims a
live job nor keeps a dead one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.jobs import FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore

STEP = 3600.0  # a one-hour step, far longer than any lease here


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


def queue_one(store: JobStore, tmp_path: Path, name: str) -> int:
    path = tmp_path / name
    path.write_bytes(b"RIFF fake audio")
    spec = JobSpec(inbox="talks", inbox_root=str(tmp_path), rel_path=name, model="tiny.en")
    job, created = store.enqueue(spec, FileIdentity.of(str(path)), max_attempts=3)
    assert created
    return job.id


def step_host_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_clock_step_forward_does_not_reclaim_a_live_lease(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = queue_one(store, tmp_path, "live.wav")
    claim = store.claim(worker="host-a/0", device="cpu", lease_seconds=60)
    assert claim is not None and claim.job.id == job_id
    step_host_clock(monkeypatch, STEP)
    assert store.reclaim_stale() == []
    assert store.heartbeat(job_id, claim.token, lease_seconds=60, progress=0.5).ok
    assert store.reclaim_stale() == []
    job = store.get(job_id)
    assert job is not None and job.state is JobState.RUNNING and job.claim_token == claim.token


def test_clock_step_back_does_not_keep_a_dead_lease(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = queue_one(store, tmp_path, "dead.wav")
    claim = store.claim(worker="host-a/0", device="cpu", lease_seconds=0.2)
    assert claim is not None
    step_host_clock(monkeypatch, -STEP)
    deadline = time.monotonic() + 30
    reclaimed = store.reclaim_stale()
    while not reclaimed and time.monotonic() < deadline:
        time.sleep(0.05)
        reclaimed = store.reclaim_stale()
    assert [j.id for j in reclaimed] == [job_id]
    assert reclaimed[0].state is JobState.QUEUED
    assert store.heartbeat(job_id, claim.token, lease_seconds=60).ok is False
