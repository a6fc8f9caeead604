"""The job store's cost per job when several daemons claim from one table.

For each backend (SQLite in a temporary folder; PostgreSQL on 127.0.0.1:5432
in a database of its own, dropped afterwards) and each table size: N
finished jobs plus --queued tiny queued jobs, written with the real schema;
then --claimers processes (each a JobStore of its own, as three daemons'
workers are) claim and finish jobs as fast as the store lets them (a job
that takes no time: only the store's own work is measured), until the queue
is empty. Reported: jobs per second over all claimers, p50/p95/max of one
claim() and of one finish(), and the query plan of the claim's candidate
search and of `whisperd status`'s counts.

    .venv/bin/python bench/claims.py [--sizes 10000 100000] [--queued 10000] [--claimers 3]
        [--backends sqlite,postgresql]

Writes bench/results/claims.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib as bl
import sqlalchemy as sa

from whisperd.jobs import AttemptEnd, AttemptOutcome, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.schema import JOBS

POSTGRES_ADMIN = os.environ.get(
    "WHISPERD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
LEASE = 600.0
INSERT_BATCH = 20_000


def _row(index: int, state: str, now: float) -> dict[str, Any]:
    rel = f"2026/talk-{index:07d}.wav"
    spec = JobSpec(inbox="main", inbox_root="/srv/inbox", rel_path=rel, model="tiny.en")
    ended = state != JobState.QUEUED.value
    at = now - 86400.0 + index * 0.01
    return {
        "inbox": "main",
        "rel_path": rel,
        "source": f"/srv/inbox/{rel}",
        "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
        "file_device": 2049,
        "file_inode": 1_000_000 + index,
        "file_size": 32_000,
        "file_mtime_ns": 1_700_000_000_000_000_000 + index,
        "state": state,
        "priority": 0,
        "attempts": 1 if ended else 0,
        "max_attempts": 3,
        "not_before": at,
        "created_at": at,
        "started_at": at if ended else None,
        "finished_at": at + 1 if ended else None,
        "outputs_json": "[]",
        "progress": 1.0 if ended else 0.0,
        "audio_seconds": 1.0,
        "cancel_requested": False,
        "updated_at": at,
        "disposed_at": at + 1 if ended else None,
        "disposed_to": f"/srv/done/{rel}" if ended else None,
    }


def fill(url: str, finished: int, queued: int) -> None:
    JobStore.open(url).close()  # the real schema, every migration
    engine = sa.create_engine(url)
    now = time.time()
    with engine.begin() as conn:
        rows: list[dict[str, Any]] = []
        for index in range(finished + queued):
            state = JobState.DONE.value if index < finished else JobState.QUEUED.value
            rows.append(_row(index, state, now))
            if len(rows) == INSERT_BATCH:
                conn.execute(JOBS.insert(), rows)
                rows = []
        if rows:
            conn.execute(JOBS.insert(), rows)
    store = JobStore.open(url)
    store.fold_state_counts()  # as a daemon's housekeeping does (store/counts.py)
    store.close()
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()


def claimer(url: str, name: str, start: Any, results: Any) -> None:
    """One daemon's worker: claim, finish at once, until nothing is left."""
    store = JobStore.open(url)
    claims: list[float] = []
    finishes: list[float] = []
    start.wait()
    began = time.perf_counter()
    while True:
        before = time.perf_counter()
        taken = store.claim(worker=f"{name}/cpu-0", device="cpu", lease_seconds=LEASE)
        claims.append(time.perf_counter() - before)
        if taken is None:
            break
        before = time.perf_counter()
        assert store.end_attempt(taken.job.id, taken.token, AttemptEnd(outcome=AttemptOutcome.DONE))
        finishes.append(time.perf_counter() - before)
    results.put(
        {"name": name, "seconds": time.perf_counter() - began, "claims": claims, "finishes": finishes}
    )
    store.close()


def plans(url: str) -> dict[str, list[str]]:
    """The plan of the claim's candidate search and of the state counts."""
    store = JobStore.open(url)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "ORDER BY" in statement.upper():
            captured.append((statement, parameters))

    engine = store._engine  # the bench reads the statements the store really sends
    sa.event.listen(engine, "before_cursor_execute", capture)
    taken = store.claim(worker="plan/cpu-0", device="cpu", lease_seconds=LEASE)
    sa.event.remove(engine, "before_cursor_execute", capture)
    assert taken is not None and captured, "the claim sent no candidate query"
    statement, parameters = captured[0]
    counted: list[tuple[str, Any]] = []

    def capture_counts(_conn: Any, _cursor: Any, sql: str, params: Any, *_rest: Any) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            counted.append((sql, params))

    sa.event.listen(engine, "before_cursor_execute", capture_counts)
    store.counts()  # what `whisperd status` and the job gauges ask
    sa.event.remove(engine, "before_cursor_execute", capture_counts)
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        claim_plan = [" ".join(map(str, r)) for r in conn.exec_driver_sql(explain + statement, parameters)]
        counts_sql, counts_params = counted[-1]
        counted_plan = conn.exec_driver_sql(explain + counts_sql, counts_params)
        counts_plan = [" ".join(map(str, r)) for r in counted_plan]
    store.close()
    return {"claim_candidates": claim_plan, "counts": counts_plan}


def time_counts(url: str, reads: int = 20) -> dict[str, float]:
    """How long `store.counts()` (status, the job gauges) takes on this table."""
    store = JobStore.open(url)
    seconds = []
    for _ in range(reads):
        began = time.perf_counter()
        store.counts()
        seconds.append(time.perf_counter() - began)
    store.close()
    return _spread(seconds)


def measure(url: str, claimers: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    processes = [
        context.Process(target=claimer, args=(url, f"host{n}", start, results)) for n in range(claimers)
    ]
    for process in processes:
        process.start()
    time.sleep(2.0)  # every claimer has opened its store (a spawn takes about a second here)
    start.set()
    runs = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join(60)
    claims = [c for r in runs for c in r["claims"]]
    finishes = [f for r in runs for f in r["finishes"]]
    wall = max(r["seconds"] for r in runs)
    jobs = len(finishes)
    return {
        "jobs": jobs,
        "wall_seconds": round(wall, 3),
        "jobs_per_second": round(jobs / wall, 1),
        "store_seconds_per_job": round(wall * claimers / max(jobs, 1), 5),
        "claim_seconds": {k: round(v, 5) for k, v in _spread(claims).items()},
        "finish_seconds": {k: round(v, 5) for k, v in _spread(finishes).items()},
        "jobs_per_claimer": {r["name"]: len(r["finishes"]) for r in runs},
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"p50": bl.percentile(values, 50), "p95": bl.percentile(values, 95), "max": max(values)}


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'jobs.db'}"


def postgres_database() -> tuple[str, sa.Engine, str]:
    name = f"whisperd_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = sa.make_url(POSTGRES_ADMIN).set(database=name).render_as_string(hide_password=False)
    return url, admin, name


def run_one(backend: str, size: int, queued: int, claimers: int, work: Path) -> dict[str, Any]:
    bl.say(f"{backend}: {size:,} finished + {queued:,} queued jobs")
    admin: sa.Engine | None = None
    name = ""
    if backend == "sqlite":
        folder = work / f"{backend}-{size}"
        folder.mkdir()
        url = sqlite_url(folder)
    else:
        url, admin, name = postgres_database()
    try:
        began = time.perf_counter()
        fill(url, size, queued)
        built = time.perf_counter() - began
        plan = plans(url)
        counts = time_counts(url)
        others = bl.ForeignLoad()
        result = measure(url, claimers)
        result.update(
            backend=backend,
            finished_jobs=size,
            queued_jobs=queued,
            claimers=claimers,
            build_seconds=round(built, 1),
            foreign_cores=round(others.cores(), 3),
            plans=plan,
            counts_seconds=counts,
        )
        bl.say(
            f"{backend} {size:,}: {result['jobs_per_second']} jobs/s, claim p95 "
            f"{result['claim_seconds']['p95'] * 1000:.1f} ms, "
            f"finish p95 {result['finish_seconds']['p95'] * 1000:.1f} ms, "
            f"counts p50 {counts['p50'] * 1000:.1f} ms"
        )
        return result
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--claimers", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    bl.add_run_arguments(parser, out_name="claims.json")
    args = parser.parse_args()
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    report: dict[str, Any] = {"machine": bl.machine_info(), "quiet_wait": quiet, "runs": []}
    with tempfile.TemporaryDirectory(prefix="whisperd-claims-") as work:
        for backend in args.backends.split(","):
            for size in args.sizes:
                report["runs"].append(run_one(backend, size, args.queued, args.claimers, Path(work)))
                bl.write_json(args.out, report)
    bl.say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
