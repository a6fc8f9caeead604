"""The claim walks an index in claim order (priority first, then oldest)
instead of sorting every queued row: with 100,000 files queued, each claim
reads a handful of rows. Checked on the statement the store really sends,
on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from whisperd.jobs import JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.schema import JOBS

QUEUED = 3000


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    opened = JobStore.open(store_url)
    yield opened
    opened.close()


def fill_queue(store: JobStore, count: int) -> None:
    """`count` queued rows written straight into the real schema (enqueue()
    one by one would take minutes), priorities mixed."""
    now = time.time()
    rows: list[dict[str, Any]] = []
    for index in range(count):
        rel = f"talk-{index:05d}.wav"
        spec = JobSpec(
            inbox="main", inbox_root="/srv/inbox", rel_path=rel, model="tiny.en", priority=index % 3
        )
        rows.append(
            {
                "inbox": "main",
                "rel_path": rel,
                "source": f"/srv/inbox/{rel}",
                "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
                "file_device": 1,
                "file_inode": 10_000 + index,
                "file_size": 100,
                "file_mtime_ns": index,
                "state": JobState.QUEUED.value,
                "priority": index % 3,
                "attempts": 0,
                "max_attempts": 3,
                "not_before": now - 1.0,
                "created_at": now,
                "outputs_json": "[]",
                "progress": 0.0,
                "cancel_requested": False,
                "updated_at": now,
            }
        )
    engine = store._engine  # the test writes the rows and reads the plan of the real statement
    with engine.begin() as conn:
        conn.execute(JOBS.insert(), rows)
        conn.exec_driver_sql("ANALYZE")


def claim_statement(store: JobStore) -> tuple[str, Any, int]:
    """The candidate query a real claim sends, its parameters, and the job it took."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "ORDER BY" in statement.upper():
            captured.append((statement, parameters))

    engine = store._engine
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        taken = store.claim(worker="plan/cpu-0", device="cpu", lease_seconds=60.0)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert taken is not None and captured, "the claim sent no candidate query"
    return captured[0][0], captured[0][1], taken.job.id


def test_claim_walks_the_claim_order_index_without_sorting(store: JobStore) -> None:
    fill_queue(store, QUEUED)
    statement, parameters, job_id = claim_statement(store)
    # The best job: highest priority (2), then the oldest of those (index 2: id 3).
    assert job_id == 3
    engine = store._engine
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = [str(r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            assert any("ix_jobs_claim_order" in step for step in plan), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan
        else:
            plan = [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters)]
            text = "\n".join(plan)
            assert "ix_jobs_claim_order" in text, text
            assert "Sort" not in text, text
