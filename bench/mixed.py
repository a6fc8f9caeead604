"""Longer and mixed work through two inboxes of different priority.

One daemon (CPU, one slot, tiny.en) watches two inboxes: `bulk` (priority 0)
and `urgent` (priority 10). Into `bulk` go a 10-minute recording, short
clips and a broken file; once the first bulk job runs, short clips go into
`urgent`. Reported:

  - the order jobs started in, and whether every urgent job started before
    every bulk job that was still queued when the urgent ones arrived (the
    priority rule a user relies on);
  - the 10-minute recording's realtime factor (job seconds per audio second)
    and audio-seconds per second, against the short clips';
  - the broken file: its end state and reason, and that it held nothing up;
  - from each drop to its sources in done/ (the rename's ctime).

    .venv/bin/python bench/mixed.py [--minutes 10] [--clips 6]

Writes bench/results/mixed.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

URGENT_PRIORITY = 10


def long_recording(minutes: float) -> Path:
    """About `minutes` of espeak-ng speech: the sentences, spoken in turn."""
    per_pass = sum(bl.wav_seconds(clip) for clip in bl.sentence_clips(len(bl.SENTENCES)))
    passes = max(1, round(minutes * 60 / per_pass))
    return bl.synthesise(" ".join(bl.SENTENCES * passes))


def broken_file(folder: Path) -> Path:
    """Bytes that are not media, under a media name."""
    path = folder / "broken.mp3"
    path.write_bytes(b"ID3" + bytes(range(256)) * 64)
    return path


def _jobs(db_path: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(str(db_path), timeout=30.0)
    connection.row_factory = sqlite3.Row
    try:
        rows = connection.execute(
            "SELECT id, inbox, rel_path, state, created_at, started_at, finished_at, "
            "audio_seconds, last_error FROM jobs ORDER BY id"
        ).fetchall()
        return [dict(row) for row in rows]
    finally:
        connection.close()


def _priority_respected(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Urgent jobs against the bulk jobs still queued when the first urgent one was queued."""
    urgent = [j for j in jobs if j["inbox"] == "urgent"]
    first_urgent = min(j["created_at"] for j in urgent)
    waiting_bulk = [
        j for j in jobs if j["inbox"] == "bulk" and j["started_at"] and j["started_at"] > first_urgent
    ]
    last_urgent_start = max(j["started_at"] for j in urgent)
    overtaken = [j["rel_path"] for j in waiting_bulk if j["started_at"] < last_urgent_start]
    return {
        "urgent_jobs": len(urgent),
        "bulk_jobs_waiting_when_urgent_arrived": len(waiting_bulk),
        "bulk_jobs_started_before_an_urgent_one": overtaken,
        "respected": not overtaken,
    }


def _speed(job: dict[str, Any]) -> dict[str, Any]:
    seconds = job["finished_at"] - job["started_at"]
    audio = job["audio_seconds"] or 0.0
    return {
        "file": job["rel_path"],
        "audio_seconds": round(audio, 1),
        "job_seconds": round(seconds, 2),
        "realtime_factor": round(seconds / audio, 4) if audio else None,
        "audio_seconds_per_second": round(audio / seconds, 2) if seconds else None,
    }


def _done_at(folder: Path, names: list[str]) -> float:
    return max((folder / name).stat().st_ctime for name in names)


def run(root: Path, models_dir: Path, minutes: float, clip_count: int, settle: float) -> dict[str, Any]:
    config = bl.DaemonConfig(
        root=root,
        models_dir=models_dir,
        settle_seconds=settle,
        inbox_options={"name": "bulk", "priority": 0},
        extra_inboxes={"urgent": {"priority": URGENT_PRIORITY}},
    )
    clips = bl.sentence_clips(clip_count)
    bulk_sources = [long_recording(minutes), *clips, broken_file(root)]
    bulk_names = ["long.wav", *(f"bulk-{n}.wav" for n in range(clip_count)), "broken.mp3"]
    urgent_names = [f"urgent-{n}.wav" for n in range(3)]
    with bl.DaemonProcess(config) as daemon:
        daemon.wait_for_event("daemon.ready")
        bulk_dropped = bl.drop(bl.stage(bulk_sources, bulk_names, root / "staging"), config.inbox)
        daemon.wait_for(
            lambda: any(j["started_at"] for j in _jobs(config.db_path)), timeout=120, what="a bulk job"
        )
        staged = bl.stage(bl.sentence_clips(len(urgent_names)), urgent_names, root / "staging")
        urgent_dropped = bl.drop(staged, root / "urgent" / "inbox")
        bl.wait_for_files(
            [root / "urgent" / "done" / n for n in urgent_names]
            + [config.done / n for n in bulk_names if n != "broken.mp3"]
            + [config.failed / "broken.mp3"],
            timeout=1800,
        )
        jobs = _jobs(config.db_path)
        memory = daemon.memory()
    broken = next(j for j in jobs if j["rel_path"] == "broken.mp3")
    return {
        "start_order": [
            f"{j['inbox']}/{j['rel_path']}" for j in sorted(jobs, key=lambda j: j["started_at"] or 0)
        ],
        "priority": _priority_respected(jobs),
        "long_recording": _speed(next(j for j in jobs if j["rel_path"] == "long.wav")),
        "short_clips": [
            _speed(j) for j in jobs if j["rel_path"].endswith(".wav") and j["rel_path"] != "long.wav"
        ],
        "broken_file": {"state": broken["state"], "reason": broken["last_error"]},
        "urgent_drop_to_done_seconds": round(
            _done_at(root / "urgent" / "done", urgent_names) - urgent_dropped, 2
        ),
        "bulk_drop_to_done_seconds": round(
            _done_at(config.done, [n for n in bulk_names if n != "broken.mp3"]) - bulk_dropped, 2
        ),
        "memory": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the long recording")
    parser.add_argument("--clips", type=int, default=6, help="short clips into the bulk inbox")
    parser.add_argument("--settle", type=float, default=2.0, help="settle_seconds (default: the shipped one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    bl.add_run_arguments(parser, out_name="mixed.json")
    args = parser.parse_args()

    models_dir = bl.prepare_model()
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    root = Path(tempfile.mkdtemp(prefix="whisperd-mixed-"))
    started = time.time()
    others = bl.ForeignLoad()
    try:
        result = run(root, models_dir, args.minutes, args.clips, args.settle)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "mixed",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "machine": machine,
        "quiet_wait": quiet,
        "foreign_cores": round(others.cores(), 3),
        "settle_seconds": args.settle,
        "options": {"model": bl.MODEL_NAME, "device": "cpu", "slots": 1, "decoding": "greedy"},
        **result,
    }
    bl.write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("priority", "long_recording", "broken_file")}, indent=2))
    bl.say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
