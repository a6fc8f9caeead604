"""How soon whisperd starts, and finishes, a file dropped into an idle daemon.

The real daemon runs with its default settle time (2 s) and a warm worker
(one job done first, so the model is loaded). Then, one at a time, a short
clip is dropped (copied beside the inbox, renamed in) and its job followed in
the job store:

  start latency    job started_at - (file's last mtime + settle_seconds): what
                   whisperd adds on top of the settle time it is told to wait
                   (target: < 0.5 s)
  drop-to-start    started_at - the rename into the inbox
  drop-to-done     finished_at - the rename into the inbox
  enqueue delay    created_at - (mtime + settle): the watcher's part
  claim delay      started_at - created_at: the wake-up and claim

    .venv/bin/python bench/latency.py [--runs 20] [--settle 2.0]

Writes bench/results/latency.json.
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

SHORT_SENTENCE = "Please close the door when you leave."
TARGET_START_LATENCY = 0.5


def job_times(db: Any, rel_path: str) -> dict[str, Any] | None:
    row = db.execute(
        "SELECT state, created_at, started_at, finished_at FROM jobs WHERE rel_path = ? ORDER BY id DESC",
        (rel_path,),
    ).fetchone()
    if row is None:
        return None
    return {"state": row[0], "created_at": row[1], "started_at": row[2], "finished_at": row[3]}


def wait_done(db: Any, rel_path: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = job_times(db, rel_path)
        if times is not None and times["state"] in ("done", "failed", "cancelled"):
            if times["state"] != "done":
                raise RuntimeError(f"{rel_path}: job ended {times['state']}")
            return times
        time.sleep(0.02)
    raise RuntimeError(f"{rel_path}: not done after {timeout:.0f} s")


def one_drop(daemon: bl.DaemonProcess, db: Any, clip: Path, name: str, settle: float) -> dict[str, float]:
    config = daemon.config
    (staged,) = bl.stage([clip], [name], config.root / "staging")
    mtime = staged.stat().st_mtime
    dropped = bl.drop([staged], config.inbox)
    times = wait_done(db, name)
    settled = mtime + settle
    return {
        "start_latency": times["started_at"] - settled,
        "drop_to_start": times["started_at"] - dropped,
        "drop_to_done": times["finished_at"] - dropped,
        "enqueue_delay": times["created_at"] - settled,
        "claim_delay": times["started_at"] - times["created_at"],
        "rename_after_mtime": dropped - mtime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="whisperd settle_seconds (default: config's)"
    )
    parser.add_argument("--gap", type=float, default=1.0, help="idle seconds between drops")
    bl.add_run_arguments(parser, out_name="latency.json", whisperd_source=False)
    args = parser.parse_args()

    models_dir = bl.prepare_model()
    clip = bl.synthesise(SHORT_SENTENCE)
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    root = Path(tempfile.mkdtemp(prefix="whisperd-latency-"))
    config = bl.DaemonConfig(root=root, models_dir=models_dir, settle_seconds=args.settle)
    runs: list[dict[str, float]] = []
    others = bl.ForeignLoad()
    try:
        with bl.DaemonProcess(config) as daemon:
            daemon.wait_for_event("daemon.ready")
            db = bl.open_db(config.db_path)
            bl.say("warm-up job (loads the model)")
            one_drop(daemon, db, clip, "warmup.wav", args.settle)
            for n in range(args.runs):
                time.sleep(args.gap)
                runs.append(one_drop(daemon, db, clip, f"run{n:03d}.wav", args.settle))
                bl.say(f"run {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()))
            db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stats = {
        key: {
            "p50": round(bl.percentile([r[key] for r in runs], 50), 3),
            "p95": round(bl.percentile([r[key] for r in runs], 95), 3),
            "max": round(max(r[key] for r in runs), 3),
        }
        for key in runs[0]
    }
    report = {
        "benchmark": "latency",
        "machine": machine,
        "machine_after": {"load_average": [round(x, 2) for x in os.getloadavg()]},
        "quiet_wait": quiet,
        "foreign_cores_during_run": round(others.cores(), 3),
        "settle_seconds": args.settle,
        "clip_seconds": round(bl.wav_seconds(clip), 2),
        "runs": len(runs),
        "seconds": stats,
        "target": {
            "start_latency_p95_below": TARGET_START_LATENCY,
            "met": stats["start_latency"]["p95"] < TARGET_START_LATENCY,
        },
        "samples": [{k: round(v, 4) for k, v in r.items()} for r in runs],
    }
    bl.write_json(args.out, report)
    print(json.dumps({"seconds": stats, "target": report["target"]}, indent=2))
    bl.say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
