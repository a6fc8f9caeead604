"""Several real processes sharing one job store (SQLite file or PostgreSQL)."""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.schema import SCHEMA_VERSION

PROCESSES = 4
JOBS = 200
# Generous: the children normally finish in a few seconds.
JOIN_TIMEOUT = 120.0


# ---------------------------------------------------------------- children ---
# Module-level so the spawn start method can import them in a fresh interpreter.


def claim_and_finish_until_empty(store_url: str, worker: str, start: Any, report: str) -> None:
    """Claim and finish jobs as fast as possible; write what happened to `report`."""
    claimed: list[tuple[int, str]] = []
    errors: list[str] = []
    store = None
    try:
        store = JobStore.open(store_url)
        start.wait(60)  # every child is connected: now they race
        while len(errors) < 5:
            try:
                taken = store.claim(worker=worker, device="cpu", lease_seconds=300)
                if taken is None:
                    break
                claimed.append((taken.job.id, taken.token))
                if not store.end_attempt(
                    taken.job.id,
                    taken.token,
                    AttemptEnd(outcome=AttemptOutcome.DONE, outputs=(f"/o/{worker}",)),
                ):
                    errors.append(f"finish refused for job {taken.job.id}")
            except Exception:
                errors.append(traceback.format_exc())
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        if store is not None:
            store.close()
        Path(report).write_text(json.dumps({"claimed": claimed, "errors": errors}))


def open_and_enqueue(store_url: str, inbox_root: str, name: str, start: Any, report: str) -> None:
    """Open a store (maybe creating its schema) at the same moment as others."""
    errors: list[str] = []
    try:
        start.wait(60)  # all at once, to race on creating the schema
        store = JobStore.open(store_url)
        try:
            spec = JobSpec(inbox="talks", inbox_root=inbox_root, rel_path=name, model="tiny.en")
            store.enqueue(spec, FileIdentity.of(os.path.join(inbox_root, name)), max_attempts=3)
        finally:
            store.close()
    except Exception:
        errors.append(traceback.format_exc())
    Path(report).write_text(json.dumps({"errors": errors}))


def run_children(target: Any, args_for: list[tuple[Any, ...]], tmp_path: Path) -> list[dict[str, Any]]:
    """Start one spawned process per args tuple and return their reports. The
    children pass `start` (a barrier) together."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(args_for))
    reports = [str(tmp_path / f"report-{i}.json") for i in range(len(args_for))]
    children = [
        context.Process(target=target, args=(*args, start, report))
        for args, report in zip(args_for, reports, strict=True)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(JOIN_TIMEOUT)
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()
    assert [child.exitcode for child in children] == [0] * len(children)
    return [json.loads(Path(report).read_text()) for report in reports]


def make_inbox(tmp_path: Path, count: int) -> tuple[Path, list[str]]:
    root = tmp_path / "inbox"
    root.mkdir()
    names = [f"clip-{i:03}.wav" for i in range(count)]
    for name in names:
        (root / name).write_bytes(name.encode())
    return root, names


# ------------------------------------------------------------------- tests ---


def test_four_processes_claim_every_job_exactly_once(store_url: str, tmp_path: Path) -> None:
    root, names = make_inbox(tmp_path, JOBS)
    store = JobStore.open(store_url)
    try:
        ids = set()
        for name in names:
            spec = JobSpec(inbox="talks", inbox_root=str(root), rel_path=name, model="tiny.en")
            job, _ = store.enqueue(spec, FileIdentity.of(str(root / name)), max_attempts=3)
            ids.add(job.id)

        reports = run_children(
            claim_and_finish_until_empty, [(store_url, f"worker-{i}") for i in range(PROCESSES)], tmp_path
        )

        errors = [error for report in reports for error in report["errors"]]
        assert errors == [], "\n".join(errors)
        claims = Counter(job_id for report in reports for job_id, _ in report["claimed"])
        assert set(claims) == ids
        assert [job_id for job_id, times in claims.items() if times != 1] == []
        assert store.counts()[JobState.DONE] == JOBS
        assert {job.attempts for job in store.list_jobs(limit=JOBS)} == {1}
    finally:
        store.close()


def test_processes_opening_a_fresh_database_together_all_succeed(store_url: str, tmp_path: Path) -> None:
    root, names = make_inbox(tmp_path, PROCESSES)

    reports = run_children(open_and_enqueue, [(store_url, str(root), name) for name in names], tmp_path)

    errors = [error for report in reports for error in report["errors"]]
    assert errors == [], "\n".join(errors)
    store = JobStore.open(store_url)
    try:
        assert store.counts()[JobState.QUEUED] == PROCESSES
    finally:
        store.close()
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version FROM whisperd_schema")).scalars().all()
    finally:
        engine.dispose()
    assert versions == [SCHEMA_VERSION]
