"""Several hundred short jobs through one daemon: does its memory stay flat?

The real daemon (all five output formats, a short settle time) gets a
one-second clip `--jobs` times, in waves of `--wave` files: each wave is
dropped at once and the next one only once it is done, so the watcher, the
queue, the worker's idle wake-up and the source moves are all exercised
again and again. A sampler thread reads the RSS of the daemon and its worker
every second; after every wave, once the worker is idle, both are read again.
The first wave is the warm-up (model load, first allocations).

Memory growth = (idle RSS after the last wave - idle RSS after the warm-up
wave) / idle RSS after the warm-up wave, for the daemon, the worker, and both
together (target: < 5 %).

    .venv/bin/python bench/soak.py [--jobs 300] [--wave 25]

Writes bench/results/soak.json and bench/results/soak.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib as bl

TARGET_GROWTH_PERCENT = 5.0


class RssSampler:
    """Samples the daemon's and its workers' RSS every `interval` s (owns its thread)."""

    def __init__(self, daemon: bl.DaemonProcess, done_count: Any, interval: float = 1.0) -> None:
        self._daemon = daemon
        self._done_count = done_count
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")
        self._started = time.monotonic()
        self.samples: list[dict[str, Any]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        workers = self._daemon.workers()
        return {
            "t": round(time.monotonic() - self._started, 2),
            "jobs_done": self._done_count(),
            "daemon_rss_mb": round(bl.rss_mb(self._daemon.pid) or 0.0, 1),
            "worker_rss_mb": round(sum(bl.rss_mb(pid) or 0.0 for pid in workers), 1),
            "worker_pids": workers,
        }


def growth(before: float, after: float) -> float:
    return round(100.0 * (after - before) / before, 2) if before else float("nan")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    idle = report["idle_after_wave"]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    done = [s["jobs_done"] for s in samples]
    axis.plot(
        done, [s["worker_rss_mb"] for s in samples], ".", ms=2, color="#8fb3d9", label="worker (sampled)"
    )
    axis.plot(
        done, [s["daemon_rss_mb"] for s in samples], ".", ms=2, color="#f2b36b", label="daemon (sampled)"
    )
    waves_done = [w["jobs_done"] for w in idle]
    axis.plot(
        waves_done, [w["worker_rss_mb"] for w in idle], "-o", ms=3, color="#3b78b8", label="worker, idle"
    )
    axis.plot(
        waves_done, [w["daemon_rss_mb"] for w in idle], "-o", ms=3, color="#e07b00", label="daemon, idle"
    )
    axis.set_xlabel("jobs done")
    axis.set_ylabel("RSS, MB")
    axis.set_yscale("log")
    g = report["growth_percent"]
    axis.set_title(
        f"{report['jobs']} jobs: RSS growth after warm-up: worker {g['worker']} %, daemon {g['daemon']} %, "
        f"total {g['total']} %",
        fontsize=10,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument(
        "--wave", type=int, default=25, help="files dropped at once; the first wave is the warm-up"
    )
    parser.add_argument("--settle", type=float, default=0.5)
    bl.add_run_arguments(parser, out_name="soak.json", whisperd_source=False)
    args = parser.parse_args()

    models_dir = bl.prepare_model()
    clip = bl.synthesise(bl.SHORT_PHRASE)
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    root = Path(tempfile.mkdtemp(prefix="whisperd-soak-"))
    config = bl.DaemonConfig(
        root=root,
        models_dir=models_dir,
        settle_seconds=args.settle,
        formats=("txt", "srt", "vtt", "json", "tsv"),
    )
    waves = [
        list(range(start, min(start + args.wave, args.jobs))) for start in range(0, args.jobs, args.wave)
    ]
    idle_after_wave: list[dict[str, Any]] = []
    started = time.monotonic()
    others = bl.ForeignLoad()
    try:
        with bl.DaemonProcess(config) as daemon:
            daemon.wait_for_event("daemon.ready")
            db = bl.open_db(config.db_path)
            db_lock = threading.Lock()

            def done_count() -> int:
                with db_lock:
                    return int(db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0])

            sampler = RssSampler(daemon, done_count)
            sampler.start()
            try:
                for index, wave in enumerate(waves):
                    names = [f"s{n:05d}.wav" for n in wave]
                    staged = bl.stage([clip] * len(names), names, root / "staging")
                    bl.drop(staged, config.inbox)
                    expected = [config.output / f"s{n:05d}.json" for n in wave]
                    bl.wait_for_files(expected, timeout=600, failed_dir=config.failed)
                    total = wave[-1] + 1
                    daemon.wait_for(lambda: done_count() >= total, timeout=60, what="jobs done")  # noqa: B023
                    time.sleep(0.5)  # the worker moves the last source, then goes idle
                    idle_after_wave.append({"wave": index, **sampler.sample()})
                    elapsed = time.monotonic() - started
                    if index == 0:
                        estimate = elapsed * len(waves)
                        bl.say(f"warm-up wave took {elapsed:.0f} s; the whole soak about {estimate:.0f} s")
                    bl.say(f"wave {index}: {idle_after_wave[-1]}")
            finally:
                sampler.stop()
            counts = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
            db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    baseline, last = idle_after_wave[0], idle_after_wave[-1]
    worker_pids = {pid for s in sampler.samples for pid in s["worker_pids"]}
    report = {
        "benchmark": "soak",
        "machine": machine,
        "machine_after": {"load_average": [round(x, 2) for x in os.getloadavg()]},
        "quiet_wait": quiet,
        "foreign_cores_during_run": round(others.cores(), 3),
        "jobs": args.jobs,
        "wave": args.wave,
        "clip_seconds": round(bl.wav_seconds(clip), 2),
        "duration_seconds": round(time.monotonic() - started, 1),
        "job_states": counts,
        "worker_processes_seen": len(worker_pids),
        "baseline_after_warmup": baseline,
        "end": last,
        "growth_percent": {
            "daemon": growth(baseline["daemon_rss_mb"], last["daemon_rss_mb"]),
            "worker": growth(baseline["worker_rss_mb"], last["worker_rss_mb"]),
            "total": growth(
                baseline["daemon_rss_mb"] + baseline["worker_rss_mb"],
                last["daemon_rss_mb"] + last["worker_rss_mb"],
            ),
        },
        "peak_sampled_mb": {
            "daemon": max(s["daemon_rss_mb"] for s in sampler.samples),
            "worker": max(s["worker_rss_mb"] for s in sampler.samples),
        },
        "idle_after_wave": idle_after_wave,
        "samples": sampler.samples,
    }
    worst = max(report["growth_percent"].values())
    report["target"] = {"growth_below_percent": TARGET_GROWTH_PERCENT, "met": worst < TARGET_GROWTH_PERCENT}
    bl.write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    shown = ("jobs", "duration_seconds", "job_states", "growth_percent", "peak_sampled_mb", "target")
    print(json.dumps({key: report[key] for key in shown}, indent=2))
    bl.say(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
