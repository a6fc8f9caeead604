"""How `whisperd status` and `whisperd jobs` scale with the jobs table, and
what one retention batch costs (SQLite).

For each size (default 10k, 100k, 1M finished jobs, plus a few queued and
running ones and some failed ones), builds a job store with the real schema
(JobStore.open), fills it in bulk, then times:
- `whisperd status` and `whisperd jobs` as a user runs them (a subprocess:
  Python start-up and imports included), best and median of --runs;
- the store reads they make, in this process;
- one retention batch (prune_finished, 500 jobs) and the incremental vacuum after it;
and prints SQLite's query plan of each read. Writes bench/results/store_scale.json.

    .venv/bin/python bench/store_scale.py
    .venv/bin/python bench/store_scale.py --sizes 10000 100000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchlib as bl  # noqa: E402

from whisperd.jobs import JobSpec, JobState  # noqa: E402
from whisperd.store.job_store import JobStore  # noqa: E402

RESULTS = REPO / "bench" / "results"
# One finished job in this many failed (the rest done), as a busy inbox might have.
FAILED_EVERY = 20
ACTIVE = 5


def _spec_json(inbox_root: str, index: int) -> str:
    spec = JobSpec(
        inbox="main", inbox_root=inbox_root, rel_path=f"2026/talk-{index:07d}.mp3", model="tiny.en"
    )
    return json.dumps(spec.to_dict(), sort_keys=True)


def fill(path: Path, finished: int, inbox_root: str) -> None:
    """`finished` ended jobs (their sources moved), then ACTIVE queued and ACTIVE running."""
    JobStore.open(f"sqlite:///{path}").close()  # the real schema, every migration
    conn = sqlite3.connect(path)
    now = time.time()
    columns = (
        "inbox, rel_path, source, spec_json, file_device, file_inode, file_size, file_mtime_ns, state, "
        "priority, attempts, max_attempts, not_before, created_at, started_at, finished_at, last_error, "
        "outputs_json, progress, audio_seconds, cancel_requested, updated_at, disposed_at, disposed_to, "
        "worker, device, claim_token, lease_expires"
    )

    def row(i: int, state: str) -> tuple[Any, ...]:
        rel = f"2026/talk-{i:07d}.mp3"
        at = now - (finished - i) * 30.0
        ended = state in ("done", "failed")
        running = state == "running"
        return (
            "main",
            rel,
            f"{inbox_root}/{rel}",
            _spec_json(inbox_root, i),
            2049,
            1_000_000 + i,
            4_000_000,
            1_700_000_000_000_000_000 + i,
            state,
            0,
            1 if ended or running else 0,
            3,
            at,
            at,
            at if ended or running else None,
            at + 20 if ended else None,
            "ffmpeg: invalid data found when processing input" if state == "failed" else None,
            json.dumps([f"/srv/out/{rel}.{f}" for f in ("txt", "srt")]) if state == "done" else "[]",
            1.0 if state == "done" else 0.0,
            60.0,
            0,
            at,
            at + 20 if ended else None,
            f"/srv/done/{rel}" if ended else None,
            "host/1/cpu0" if running else None,
            "cpu" if running else None,
            f"token-{i}" if running else None,
            now + 3600 if running else None,
        )

    marks = ",".join("?" * 28)
    with conn:
        batch: list[tuple[Any, ...]] = []
        for i in range(finished):
            batch.append(row(i, "failed" if i % FAILED_EVERY == 0 else "done"))
            if len(batch) == 50_000:
                conn.executemany(f"INSERT INTO jobs ({columns}) VALUES ({marks})", batch)
                batch = []
        for j in range(ACTIVE):
            batch.append(row(finished + j, "queued"))
            batch.append(row(finished + ACTIVE + j, "running"))
        conn.executemany(f"INSERT INTO jobs ({columns}) VALUES ({marks})", batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()


def cli_seconds(config: Path, args: list[str], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "whisperd.cli", *args, "--config", str(config)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        times.append(time.perf_counter() - started)
    return {"best": min(times), "median": statistics.median(times)}


def timed(call: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def plans(path: Path) -> dict[str, list[str]]:
    """SQLite's plan of each read `status` and `jobs` make (their SQL, by hand)."""
    active = "('queued', 'running')"
    queries = {
        "counts": "SELECT state, count(*) FROM jobs GROUP BY state",
        "running": "SELECT * FROM jobs WHERE state IN ('running') ORDER BY id DESC LIMIT 1000",
        "queued (first 10)": "SELECT * FROM jobs WHERE state IN ('queued') ORDER BY id DESC LIMIT 10",
        "failed (ignored files)": "SELECT * FROM jobs WHERE state IN ('failed') ORDER BY id DESC LIMIT 1000",
        "jobs (newest 30)": "SELECT * FROM jobs ORDER BY id DESC LIMIT 30",
        "stuck sources": "SELECT jobs.* FROM jobs JOIN source_moves ON source_moves.job_id = jobs.id "
        "WHERE source_moves.stuck_reason IS NOT NULL AND jobs.disposed_at IS NULL "
        "ORDER BY jobs.id LIMIT 1000",
        "prune candidates (age)": "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND "
        "disposed_at IS NOT NULL AND finished_at < 0 ORDER BY finished_at LIMIT 500",
        "active at a path": "SELECT * FROM jobs WHERE inbox = 'main' AND rel_path = 'x' "
        f"AND state IN {active}",
    }
    conn = sqlite3.connect(path)
    try:
        return {
            name: [str(step[3]) for step in conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
            for name, sql in queries.items()
        }
    finally:
        conn.close()


def measure(size: int, runs: int, work: Path) -> dict[str, Any]:
    folder = work / f"n{size}"
    # The state folder apart from the inbox's folders (whisperd refuses an overlap).
    (folder / "state").mkdir(parents=True)
    db = folder / "state" / "jobs.db"
    started = time.perf_counter()
    fill(db, size, str(folder / "inbox"))
    built = time.perf_counter() - started
    config = folder / "config.toml"
    mirrors = "".join(f'{key} = "{folder / key}"\n' for key in ("output", "cancel", "done", "failed"))
    config.write_text(
        f'[daemon]\nstate_dir = "{folder / "state"}"\n\n[[inbox]]\nname = "main"\n'
        f'path = "{folder / "inbox"}"\n{mirrors}',
        encoding="utf-8",
    )
    store = JobStore.open_read_only(f"sqlite:///{db}")
    try:
        reads = {
            "counts": timed(store.counts, runs),
            "list running": timed(lambda: store.list_jobs(states=[JobState.RUNNING], limit=1000), runs),
            "list failed 1000": timed(lambda: store.list_jobs(states=[JobState.FAILED], limit=1000), runs),
            "list newest 30": timed(lambda: store.list_jobs(limit=30), runs),
            "stuck sources": timed(store.stuck_sources, runs),
        }
    finally:
        store.close()
    result: dict[str, Any] = {
        "finished_jobs": size,
        "build_seconds": round(built, 1),
        "file_mb": round(db.stat().st_size / 1e6, 1),
        "status_cli": cli_seconds(config, ["status"], runs),
        "jobs_cli": cli_seconds(config, ["jobs"], runs),
        "store_reads_best_seconds": reads,
        "plans": plans(db),
    }
    writer = JobStore.open(f"sqlite:///{db}")
    try:
        started = time.perf_counter()
        pruned = writer.prune_finished(keep_days=0, keep_jobs=max(0, size - 500), batch=500)
        result["prune_batch"] = {"jobs": pruned, "seconds": time.perf_counter() - started}
        started = time.perf_counter()
        writer.vacuum_free_pages(2000)
        result["vacuum_2000_pages_seconds"] = time.perf_counter() - started
    finally:
        writer.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for size in args.sizes:
            result = measure(size, args.runs, Path(work))
            results.append(result)
            print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    document = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "results": results}
    bl.write_json(RESULTS / "store_scale.json", document)  # with the commit and arguments that made it
    return 0


if __name__ == "__main__":
    sys.exit(main())
