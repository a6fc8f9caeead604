"""How long a cancel takes when the job runs on another host.

Three daemons (`whisperd run`, instances host0..host2, each with its own
state folder and one CPU slot) share one fresh PostgreSQL database and one
inbox tree (inbox, cancel, output, done, failed), as hosts on shared storage
do. Each round drops a long clip (about 90 s of espeak-ng speech) into the
shared inbox, waits until some host runs it and has reported progress, then
moves the file into the shared cancel folder, and times until the job store
says cancelled: the running host's worker has stopped and written the end.
Every host's watcher sees the moved file; whichever matches it first asks
the store to cancel, and the running host hears of it by LISTEN/NOTIFY
(polling is the fallback). Rounds where the host that asked is not the one
that ran the job are reported apart: that is the cross-host path.

    .venv/bin/python bench/cancel_hosts.py [--runs 20] [--hosts 3]

Writes bench/results/cancel_hosts.json. Needs ffmpeg, espeak-ng and the
PostgreSQL server (WHISPERD_BENCH_POSTGRES_URL, default the local one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib as bl
import sqlalchemy as sa
from cancel_latency import TEXT, Daemon, _models_folder, _speak

from whisperd.jobs import Job, JobState
from whisperd.store.job_store import JobStore

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cancel_hosts.json"
POSTGRES_ADMIN = os.environ.get(
    "WHISPERD_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TARGET_P95_SECONDS = 1.0
POLL_SECONDS = 0.01
GIVE_UP_SECONDS = 20.0
FOLDERS = ("inbox", "output", "cancel", "done", "failed")


def _write_config(root: Path, shared: Path, models: Path, instance: str, url: str) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "daemon": {
            "state_dir": str(root / "state"),
            "instance": instance,
            "database_url": url,
            "log_format": "json",
        },
        "models": {"folder": str(models)},
        "workers": {"devices": "cpu", "cpu_slots": 1},
        "metrics": {"enabled": False},
    }
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    lines += ["[[inbox]]", 'name = "shared"', f"path = {json.dumps(str(shared / 'inbox'))}"]
    lines += [f"{name} = {json.dumps(str(shared / name))}" for name in FOLDERS[1:]]
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def _job(store: JobStore, name: str) -> Job | None:
    return next((j for j in store.list_jobs(limit=50) if j.spec.rel_path == name), None)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(POLL_SECONDS)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _one_round(store: JobStore, hosts: list[Daemon], shared: Path, clip: Path, number: int) -> dict[str, Any]:
    name = f"long-{number:03d}.wav"
    temp = shared / "inbox" / f".{name}.part"
    shutil.copyfile(clip, temp)
    os.rename(temp, shared / "inbox" / name)

    def running_with_progress() -> Job | None:
        job = _job(store, name)
        return job if job is not None and job.state is JobState.RUNNING and job.progress > 0 else None

    job = _wait(running_with_progress, 300.0, f"{name} running with progress")
    started = time.monotonic()
    os.rename(shared / "inbox" / name, shared / "cancel" / name)

    def cancelled() -> bool:
        current = _job(store, name)
        if current is not None and not current.state.is_active and current.state is not JobState.CANCELLED:
            raise SystemExit(f"{name} ended {current.state.value}, not cancelled")
        return current is not None and current.state is JobState.CANCELLED

    _wait(cancelled, GIVE_UP_SECONDS, f"{name} cancelled")
    seconds = time.monotonic() - started
    ran_on = (job.worker or "?").split("/", 1)[0]
    _wait(lambda: any(h.find("job.cancelling", job_id=job.id) for h in hosts), 10.0, "the cancel's log line")
    asked_by = sorted(str(h.config.parent.name) for h in hosts if h.find("job.cancelling", job_id=job.id))
    bl.say(f"{name}: ran on {ran_on}, asked by {','.join(asked_by)}, cancelled after {seconds:.3f} s")
    return {
        "job_id": job.id,
        "ran_on": ran_on,
        "asked_by": asked_by,
        "cross_host": ran_on not in asked_by,
        "progress": round(job.progress, 3),
        "seconds": round(seconds, 4),
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {**bl.summary(values), "p95": round(bl.percentile(values, 95), 3)}


def _idle(store: JobStore) -> bool:
    return not store.list_jobs(states=[JobState.RUNNING, JobState.QUEUED], limit=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="cancels (default: %(default)s)")
    parser.add_argument("--hosts", type=int, default=3, help="daemons on one database (default: %(default)s)")
    parser.add_argument("--models", help="folder holding tiny.en.pt (default: import the bundled tiny.en)")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=1200.0,
        help="seconds to wait for a quiet machine (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install {tool})")
    quiet = bl.wait_for_quiet(max_wait=args.max_wait)
    database = f"whisperd_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {database}")
    url = sa.make_url(POSTGRES_ADMIN).set(database=database).render_as_string(hide_password=False)
    hosts: list[Daemon] = []
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="whisperd-cancel-hosts-") as scratch:
            root = Path(scratch)
            models = _models_folder(args.models, root)
            clip = root / "long.wav"
            _speak(f"{TEXT} {TEXT}", clip)
            shared = root / "shared"
            for folder in FOLDERS:
                (shared / folder).mkdir(parents=True)
            for index in range(args.hosts):
                home = root / f"host{index}"
                config = _write_config(home, shared, models, f"host{index}", url)
                hosts.append(Daemon(config, home, store_url=url))
                hosts[-1].start()
            store = JobStore.open(url)
            try:
                for number in range(args.runs):
                    rounds.append(_one_round(store, hosts, shared, clip, number))
                    _wait(lambda: _idle(store), 60.0, "the hosts idle again")
            finally:
                store.close()
    finally:
        for host in hosts:
            host.stop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.dispose()
    every = [r["seconds"] for r in rounds]
    cross = [r["seconds"] for r in rounds if r["cross_host"]]
    result = {
        "provenance": bl.provenance(),
        "machine": bl.machine_info(),
        "quiet_wait": quiet,
        "settings": {"hosts": args.hosts, "slots_per_host": 1, "device": "cpu", "model": "tiny.en"},
        "target_p95_seconds": TARGET_P95_SECONDS,
        "all": _spread(every),
        "cross_host": _spread(cross),
        "rounds": rounds,
    }
    bl.write_json(args.out, result)
    bl.say(f"all {len(every)}: {result['all']}")
    bl.say(f"cross-host {len(cross)}: {result['cross_host']}")
    bl.say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
