"""2,000 files dropped at once: how long until each is a job, exactly once.

The real daemon runs with its default settle time and rescan period and a
warm worker (one job done first). 2,000 copies of one short valid wav are
made beside the inbox, then renamed in one after the other as fast as the
file system allows (atomic drops). The job store is polled (a plain count of
rows) until all 2,000 are there. The worker is not held back: it transcribes
while the rest is being queued, as it would for a real user, so the measure
is the honest one (queueing competes with transcription for the 2 cores).
After a further look a few seconds later, every file must have exactly one
job (no duplicate rel_path) and the daemon's memory is read.

    .venv/bin/python bench/queue_load.py [--files 2000]

Writes bench/results/queue_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

TARGET_SECONDS = 10.0


def count_rows(db: Any, prefix: str) -> tuple[int, int]:
    rows, distinct = db.execute(
        "SELECT count(*), count(DISTINCT rel_path) FROM jobs WHERE rel_path LIKE ?", (prefix + "%",)
    ).fetchone()
    return int(rows), int(distinct)


def states(db: Any, prefix: str) -> dict[str, int]:
    query = "SELECT state, count(*) FROM jobs WHERE rel_path LIKE ? GROUP BY state"
    return {state: int(n) for state, n in db.execute(query, (prefix + "%",)).fetchall()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="whisperd settle_seconds (default: config's)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    bl.add_run_arguments(parser, out_name="queue_load.json", whisperd_source=True)
    args = parser.parse_args()
    source = bl.whisperd_source(args.whisperd_rev)

    models_dir = bl.prepare_model()
    clip = bl.synthesise(bl.SHORT_PHRASE)
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    root = Path(tempfile.mkdtemp(prefix="whisperd-queue-"))
    config = bl.DaemonConfig(
        root=root,
        models_dir=models_dir,
        settle_seconds=args.settle,
        shutdown_grace_seconds=2.0,
        source=source,
    )
    prefix = "q-"
    names = [f"{prefix}{n:05d}.wav" for n in range(args.files)]
    timeline: list[tuple[float, int]] = []
    try:
        staged = bl.stage([clip] * len(names), names, root / "staging")
        with bl.DaemonProcess(config) as daemon:
            daemon.wait_for_event("daemon.ready")
            (warm,) = bl.stage([clip], ["warmup.wav"], root / "staging")
            bl.drop([warm], config.inbox)
            bl.wait_for_files([config.output / "warmup.txt"], timeout=120, failed_dir=config.failed)
            memory_before = daemon.memory()
            db = bl.open_db(config.db_path)
            bl.say(f"dropping {len(staged)} files")
            others = bl.ForeignLoad()
            started = bl.drop(staged, config.inbox)
            renamed = time.time() - started
            rows = 0
            while rows < len(names) and time.time() - started < args.timeout:
                time.sleep(0.1)
                rows, _ = count_rows(db, prefix)
                timeline.append((round(time.time() - started, 2), rows))
            all_queued = time.time() - started
            foreign = others.cores()
            bl.say(f"{rows} jobs after {all_queued:.2f} s; looking again in 5 s for duplicates")
            time.sleep(5.0)
            rows_later, distinct_later = count_rows(db, prefix)
            state_counts = states(db, prefix)
            memory_after = daemon.memory()
            db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # Time when the first and last job appeared (from the 0.1 s polling).
    first = next((t for t, n in timeline if n > 0), None)
    report = {
        "benchmark": "queue_load",
        "machine": machine,
        "machine_after": {"load_average": [round(x, 2) for x in os.getloadavg()]},
        "quiet_wait": quiet,
        "foreign_cores_while_queueing": round(foreign, 3),
        "files": len(names),
        "settle_seconds": args.settle,
        "whisperd_rev": args.whisperd_rev or "this checkout",
        "rename_seconds": round(renamed, 3),
        "seconds_to_first_job": first,
        "seconds_to_all_jobs": round(all_queued, 2),
        "jobs": rows_later,
        "distinct_files": distinct_later,
        "duplicates": rows_later - distinct_later,
        "missing": len(names) - distinct_later,
        "states_after": state_counts,
        "daemon_memory_before": memory_before,
        "daemon_memory_after": memory_after,
        "target": {
            "all_jobs_within_seconds": TARGET_SECONDS,
            "met": rows == len(names)
            and all_queued <= TARGET_SECONDS
            and rows_later == distinct_later == len(names),
        },
        "timeline": timeline,
    }
    bl.write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("timeline", "machine")}, indent=2))
    bl.say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
