"""Check whisperd's GPU pool on a machine with an NVIDIA GPU, end to end.

Runs the real daemon (`whisperd run`, workers.devices = "auto") on a models
folder and reports what a user and an operator would see:

- the device each job ran on (must be cuda:N on a GPU machine);
- GPU memory (NVML): the device and each worker process, at start, with the
  models loaded, and after they were unloaded for being idle;
- eviction: with memory_reserve_mb set so that only one of two models fits,
  the second model's job unloads the first;
- cancel: a long clip moved into cancel/ while it runs, and the worker's GPU
  memory afterwards;
- the realtime factor of each model (processing seconds per audio second).

    python bench/gpu_check.py run --models DIR [--model tiny.en] [--second-model NAME] [--clips DIR]
    python bench/gpu_check.py make-clips DIR             (needs espeak-ng; run it where that exists)
    python bench/gpu_check.py make-random DIR --arch tiny.en --arch large-v3

Without a GPU, `run` stops unless given --allow-cpu, in which case it runs the
same steps on the CPU (RSS instead of VRAM, the RAM budget instead of the GPU
reserve) and says loudly that no GPU was found. A report is printed and written
as JSON to bench/results/gpu_check.json. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from whisperd.devices.nvml import NvmlProbe  # noqa: E402 - after the path fix above

DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check.json"
MiB = 2**20
# Spoken by espeak-ng for `make-clips`: everyday English, 4-8 s each.
CLIP_TEXTS = (
    "The bus to the airport leaves from the north side of the station every twenty minutes.",
    "Please send the signed contract back to our office before the end of next week.",
    "A light rain fell over the hills all afternoon, and the rivers rose by evening.",
    "Our team will present the new budget to the board on Thursday morning.",
    "He fixed the broken chair with two screws, some glue and a great deal of patience.",
)
# openai-whisper architectures for `make-random`:
# (n_mels, n_vocab, width, encoder layers, decoder layers); heads are width / 64.
ARCHES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny.en": (80, 51864, 384, 4, 4),
    "tiny": (80, 51865, 384, 4, 4),
    "base.en": (80, 51864, 512, 6, 6),
    "base": (80, 51865, 512, 6, 6),
    "small.en": (80, 51864, 768, 12, 12),
    "small": (80, 51865, 768, 12, 12),
    "medium.en": (80, 51864, 1024, 24, 24),
    "medium": (80, 51865, 1024, 24, 24),
    "large-v3": (128, 51866, 1280, 32, 32),
    "turbo": (128, 51866, 1280, 32, 4),
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- inputs


def make_clips(folder: Path) -> list[Path]:
    """Speech clips (WAV) from espeak-ng, to carry to a machine without it."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("gpu_check: espeak-ng is not installed; make the clips elsewhere and pass --clips")
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for number, text in enumerate(CLIP_TEXTS, start=1):
        path = folder / f"clip{number}.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), "--stdin"],
            input=text.encode(),
            check=True,
            capture_output=True,
        )
        made.append(path)
    return made


def long_clip(clips: Sequence[Path], target: Path, minutes: float) -> float:
    """The clips repeated into one WAV of about `minutes`; returns its seconds."""
    with wave.open(str(clips[0]), "rb") as first:
        params = first.getparams()
    frames_wanted = int(minutes * 60 * params.framerate)
    written = 0
    with wave.open(str(target), "wb") as out:
        out.setparams(params)
        while written < frames_wanted:
            for clip in clips:
                with wave.open(str(clip), "rb") as part:
                    if part.getparams()[:3] != params[:3]:
                        raise SystemExit(
                            f"gpu_check: {clip} is not in the format of {clips[0]} (WAV, same rate)"
                        )
                    frames = part.readframes(part.getnframes())
                out.writeframes(frames)
                written += len(frames) // (params.sampwidth * params.nchannels)
    return written / params.framerate


def make_random(folder: Path, arches: Sequence[str]) -> list[Path]:
    """Checkpoints with the real dimensions of each architecture and random
    weights (<arch>-random.pt): right for memory, unload, health and cancel
    checks, meaningless for transcripts and realtime factors."""
    import numpy as np

    from whisperd.models.checkpoints import save_checkpoint
    from whisperd.models.convert import whisper_state_shapes

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = []
    for arch in arches:
        if arch not in ARCHES:
            raise SystemExit(f"gpu_check: unknown architecture {arch!r}; known: {', '.join(ARCHES)}")
        n_mels, n_vocab, width, enc_layers, dec_layers = ARCHES[arch]
        dims = {
            "n_mels": n_mels,
            "n_vocab": n_vocab,
            "n_audio_ctx": 1500,
            "n_audio_state": width,
            "n_audio_head": width // 64,
            "n_audio_layer": enc_layers,
            "n_text_ctx": 448,
            "n_text_state": width,
            "n_text_head": width // 64,
            "n_text_layer": dec_layers,
        }
        state = {}
        for key, shape in whisper_state_shapes(dims).items():
            if key == "encoder.positional_embedding":
                state[key] = _sinusoids(shape[0], shape[1])
            elif len(shape) == 1:  # layer-norm gains are 1, every bias 0: stable activations
                state[key] = np.full(shape, 1.0 if key.endswith(".weight") else 0.0, dtype=np.float16)
            else:
                state[key] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        path = folder / f"{arch}-random.pt"
        save_checkpoint(dims, state, str(path))
        say(f"wrote {path} ({path.stat().st_size / MiB:.0f} MiB)")
        made.append(path)
    return made


def _sinusoids(length: int, channels: int) -> Any:
    import numpy as np

    increment = math.log(10000) / (channels // 2 - 1)
    inverse = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inverse[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """`whisperd run` in a subprocess with one inbox per model; JSON logs in a file."""

    def __init__(self, root: Path, models: Path, inboxes: dict[str, str], workers: dict[str, Any]) -> None:
        self.root = root
        self.models = models
        self.inboxes = inboxes  # inbox name -> model name
        self.workers = workers
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def folder(self, inbox: str, kind: str) -> Path:
        return self.root / inbox / kind

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(self._config(), encoding="utf-8")
        env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONPATH": _pythonpath()}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "whisperd.cli", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.wait_for(lambda: bool(self.events("daemon.ready")), timeout=180, what="daemon.ready")

    def _config(self) -> str:
        sections: dict[str, dict[str, Any]] = {
            "daemon": {
                "state_dir": str(self.root.parent / "state"),
                "settle_seconds": 0.5,
                "rescan_seconds": 5.0,
                "log_level": "info",
                "log_format": "json",
            },
            "models": {"folder": str(self.models), "default": next(iter(self.inboxes.values()))},
            "workers": {"devices": "auto", "heartbeat_seconds": 0.5, **self.workers},
            "metrics": {"enabled": False},
        }
        parts = [f"[{name}]\n{_toml(values)}" for name, values in sections.items()]
        for inbox, model in self.inboxes.items():
            table = {"name": inbox, "model": model, "language": "en", "formats": ["txt", "json"]}
            for kind in ("inbox", "output", "cancel", "done", "failed"):
                table["path" if kind == "inbox" else kind] = str(self.folder(inbox, kind))
            parts.append("[[inbox]]\n" + _toml(table))
        return "\n\n".join(parts) + "\n"

    def events(self, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
        found = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict) or (name is not None and item.get("event") != name):
                continue
            if all(item.get(key) == value for key, value in match.items()):
                found.append(item)
        return found

    def wait_for(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process is not None and self.process.poll() is not None:
                raise SystemExit(f"gpu_check: whisperd exited waiting for {what}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"gpu_check: timed out after {timeout:.0f} s waiting for {what}; see {self.log_path}"
                )
            time.sleep(0.1)

    def worker_pids(self) -> dict[str, dict[str, Any]]:
        """Slot -> {device, pid} of the newest worker of each slot."""
        return {
            e["slot"]: {"device": e["device"], "pid": int(e["pid"])} for e in self.events("worker.started")
        }

    def drop(self, inbox: str, source: Path, name: str) -> Path:
        folder = self.folder(inbox, "inbox")
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{name}.part"
        shutil.copyfile(source, temp)
        os.rename(temp, folder / name)
        return folder / name

    def jobs(self) -> list[dict[str, Any]]:
        rows = _query(
            self.root.parent / "state" / "jobs.db",
            "SELECT id, inbox, rel_path, state, attempts, device, started_at, finished_at, audio_seconds,"
            " progress, last_error FROM jobs ORDER BY id",
        )
        keys = ("id", "inbox", "file", "state", "attempts", "device", "started_at", "finished_at")
        return [dict(zip((*keys, "audio_seconds", "progress", "error"), row, strict=True)) for row in rows]

    def job(self, inbox: str, name: str) -> dict[str, Any] | None:
        found = [j for j in self.jobs() if j["inbox"] == inbox and j["file"] == name]
        return found[-1] if found else None

    def wait_ended(self, inbox: str, names: Sequence[str], timeout: float) -> None:
        def ended() -> bool:
            jobs = [self.job(inbox, n) for n in names]
            return all(j is not None and j["state"] in ("done", "failed", "cancelled") for j in jobs)

        self.wait_for(ended, timeout=timeout, what=f"{len(names)} job(s) in {inbox} to end")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _toml(values: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())


def _pythonpath() -> str:
    parts = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return os.pathsep.join(parts)


def _query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(str(db), timeout=30.0)
    try:
        return list(connection.execute(sql))
    finally:
        connection.close()


# --------------------------------------------------------------------------- measuring


class Meter:
    """Memory of the GPUs (NVML) and of the worker processes (NVML per
    process on a GPU; RSS on the CPU)."""

    def __init__(self, probe: NvmlProbe, gpus: list[int]) -> None:
        self.probe = probe
        self.gpus = gpus
        self.snapshots: dict[str, dict[str, Any]] = {}

    def take(self, label: str, daemon: Daemon | None) -> dict[str, Any]:
        workers = {}
        for slot, worker in (daemon.worker_pids() if daemon else {}).items():
            pid = worker["pid"]
            gpu = {str(i): _mib(self.probe.read_process_gpu_memory(i, pid)) for i in self.gpus}
            workers[slot] = {"pid": pid, "alive": _alive(pid), "gpu_mib": gpu, "rss_mib": _rss_mib(pid)}
        devices = {}
        for index in self.gpus:
            reading = self.probe.read(index)
            devices[str(index)] = {
                "used_mib": _mib(reading.memory_used_bytes) if reading.ok else None,
                "free_mib": _mib(reading.memory_free_bytes) if reading.ok else None,
                "healthy": reading.healthy,
                "error": reading.error,
            }
        snapshot = {"devices": devices, "workers": workers}
        self.snapshots[label] = snapshot
        say(f"memory [{label}]: {_memory_line(snapshot)}")
        return snapshot

    def device_used_mib(self, label: str) -> float | None:
        """Memory in use on the first GPU in a snapshot (all processes)."""
        devices = list(self.snapshots[label]["devices"].values())
        return devices[0]["used_mib"] if devices else None

    def worker_mib(self, label: str) -> float | None:
        """The (first) worker's GPU memory in a snapshot, else its RSS on the CPU."""
        workers = list(self.snapshots[label]["workers"].values())
        if not workers:
            return None
        if self.gpus:
            values = [v for v in workers[0]["gpu_mib"].values() if v is not None]
            return sum(values) if values else None
        value = workers[0]["rss_mib"]
        return float(value) if value is not None else None


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 1)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _memory_line(snapshot: dict[str, Any]) -> str:
    parts = [f"gpu{i} used {d['used_mib']} MiB" for i, d in snapshot["devices"].items()]
    for slot, w in snapshot["workers"].items():
        parts.append(f"{slot} pid {w['pid']} gpu {w['gpu_mib']} MiB, rss {w['rss_mib']} MiB")
    return "; ".join(parts) or "nothing to measure"


def environment(probe: NvmlProbe) -> dict[str, Any]:
    devices = probe.devices()
    torch_line = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.__version__, torch.version.cuda, "
            "torch.cuda.device_count() if torch.cuda.is_available() else 0)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return {
        "nvml_error": probe.start_error,
        "gpus": [
            {"index": d.index, "name": d.name, "memory_mib": _mib(d.memory_total_bytes)} for d in devices
        ],
        "torch": torch_line[0] if torch_line else None,
        "torch_cuda": torch_line[1] if len(torch_line) > 1 else None,
        "torch_cuda_devices": int(torch_line[2]) if len(torch_line) > 2 else 0,
        "ffmpeg": shutil.which("ffmpeg"),
        "ffprobe": shutil.which("ffprobe"),
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------- the check


class Check:
    """Results and pass/fail lines, written to the JSON report."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"checks": []}

    def expect(self, name: str, ok: bool, detail: str) -> None:
        self.report["checks"].append({"name": name, "ok": ok, "detail": detail})
        say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")


def run(args: argparse.Namespace) -> int:
    check = Check()
    report = check.report
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["host"] = os.uname().nodename
    probe = NvmlProbe()
    env = environment(probe)
    report["environment"] = env
    gpus = [g["index"] for g in env["gpus"]]
    report["gpu_found"] = bool(gpus)
    if not env["ffmpeg"] or not env["ffprobe"]:
        return _stop(args, report, "ffmpeg and ffprobe are needed (whisperd decodes every file with them)")
    if not gpus:
        reason = env["nvml_error"] or "NVML sees no GPU"
        if not args.allow_cpu:
            return _stop(
                args, report, f"no GPU found ({reason}); use --allow-cpu to run the steps on the CPU"
            )
        say("=" * 78)
        say(f"NO GPU FOUND ({reason}).")
        say("Running on the CPU because of --allow-cpu: every figure below is a CPU stand-in")
        say("(RSS for VRAM, the RAM budget for the GPU reserve). Nothing here was measured on a GPU.")
        say("=" * 78)
    report["mode"] = "gpu" if gpus else "cpu"

    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    models = _models_folder(work / "models", Path(args.models).resolve(), args.model, args.second_model)
    first, second = args.model, args.second_model or f"{args.model}-b"
    clips = sorted(Path(args.clips).glob("*.wav")) if args.clips else make_clips(work / "clips")
    if not clips:
        return _stop(args, report, f"no .wav clips in {args.clips}")
    long_path = work / "long.wav"
    long_seconds = long_clip(clips, long_path, args.long_minutes)
    report["inputs"] = {
        "models": [first, second],
        "clips": len(clips),
        "long_clip_seconds": round(long_seconds, 1),
        "idle_unload_seconds": args.idle_seconds,
    }
    meter = Meter(probe, gpus)
    _devices_memory_cancel(args, check, meter, work, models, (first, second), clips, long_path)
    _eviction(args, check, meter, work, models, (first, second), clips[0], gpus)
    report["memory"] = meter.snapshots
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not gpus:
        report["warning"] = "no GPU found: CPU stand-in figures only (--allow-cpu)"
    _write(Path(args.out), report)
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    say(f"{len(report['checks']) - len(failed)} checks passed, {len(failed)} failed; report in {args.out}")
    if not gpus:
        say("REMINDER: no GPU was found; this was a CPU run.")
    return 1 if failed else 0


def _stop(args: argparse.Namespace, report: dict[str, Any], reason: str) -> int:
    say(f"gpu_check: {reason}")
    report["stopped"] = reason
    _write(Path(args.out), report)
    return 2


def _models_folder(folder: Path, source: Path, first: str, second: str | None) -> Path:
    """A work folder of links to the models; without a second model, the
    first one again under another name, so two models compete for memory."""
    folder.mkdir(parents=True)
    original = source / f"{first}.pt"
    if not original.is_file():
        raise SystemExit(f"gpu_check: {original} not found (give --models DIR holding {first}.pt)")
    (folder / f"{first}.pt").symlink_to(original)
    if second is None:
        (folder / f"{first}-b.pt").symlink_to(original)
    else:
        other = source / f"{second}.pt"
        if not other.is_file():
            raise SystemExit(f"gpu_check: {other} not found")
        (folder / f"{second}.pt").symlink_to(other)
    return folder


def _devices_memory_cancel(
    args: argparse.Namespace,
    check: Check,
    meter: Meter,
    work: Path,
    models: Path,
    names: tuple[str, str],
    clips: list[Path],
    long_path: Path,
) -> None:
    report = check.report
    inboxes = {"a": names[0], "b": names[1]}
    daemon = Daemon(
        work / "run1",
        models,
        inboxes,
        {"model_idle_unload_seconds": args.idle_seconds, "cancel_grace_seconds": 10.0},
    )
    meter.take("before whisperd", None)
    say(f"starting whisperd (devices = auto), log: {daemon.log_path}")
    daemon.start()
    try:
        _wait_workers_up(daemon, meter)
        meter.take("workers started", daemon)
        for inbox, model in inboxes.items():
            dropped = [f"{inbox}-{n}.wav" for n in range(1, args.clips_per_model + 1)]
            for number, name in enumerate(dropped):
                daemon.drop(inbox, clips[number % len(clips)], name)
            daemon.wait_ended(inbox, dropped, timeout=args.timeout)
            meter.take(f"{model} loaded", daemon)
        _check_devices(check, daemon, bool(meter.gpus))
        report["realtime_factor"] = _realtime_factors(daemon, inboxes)
        daemon.wait_for(
            lambda: len(daemon.events("model.unloaded", reason="idle")) >= 2,
            timeout=args.idle_seconds * 3 + 120,
            what="both models unloaded for being idle",
        )
        time.sleep(1.0)
        meter.take("after idle unload", daemon)
        _check_idle_unload(check, meter, names)
        _cancel(args, check, meter, daemon, long_path)
    finally:
        daemon.stop()
    report["jobs"] = daemon.jobs()


def _wait_workers_up(daemon: Daemon, meter: Meter) -> None:
    """Until every worker has a CUDA context (its canary ran); on the CPU, torch loaded."""
    slots = int(daemon.events("daemon.ready")[0]["slots"])
    daemon.wait_for(lambda: len(daemon.worker_pids()) >= slots, timeout=60, what="worker.started")
    if not meter.gpus:
        # No context to wait for: wait until torch is in (its RSS), then for the canary.
        pids = [w["pid"] for w in daemon.worker_pids().values()]
        daemon.wait_for(
            lambda: all((_rss_mib(p) or 0) > 250 for p in pids),
            timeout=120,
            what="the workers importing torch",
        )
        time.sleep(3.0)
        return

    def all_on_gpu() -> bool:
        pids = [w["pid"] for w in daemon.worker_pids().values()]
        return all(any(meter.probe.read_process_gpu_memory(i, p) for i in meter.gpus) for p in pids)

    try:
        daemon.wait_for(all_on_gpu, timeout=120, what="the workers' CUDA contexts")
    except SystemExit:
        say("NVML does not list the workers' processes (another pid namespace?); per-process VRAM unknown")


def _check_devices(check: Check, daemon: Daemon, on_gpu: bool) -> None:
    jobs = daemon.jobs()
    devices = sorted({str(j["device"]) for j in jobs})
    states = sorted({str(j["state"]) for j in jobs})
    check.expect("jobs done", states == ["done"], f"{len(jobs)} jobs, states {states}")
    if on_gpu:
        check.expect("jobs on a GPU", all(d.startswith("cuda:") for d in devices), f"devices {devices}")
    else:
        check.expect("jobs on the CPU (no GPU found)", devices == ["cpu"], f"devices {devices}")


def _realtime_factors(daemon: Daemon, inboxes: dict[str, str]) -> dict[str, Any]:
    """Per model: processing seconds per audio second, first job (with the
    model load) and the median of the others."""
    factors: dict[str, Any] = {}
    for inbox, model in inboxes.items():
        values = [
            (j["finished_at"] - j["started_at"]) / j["audio_seconds"]
            for j in daemon.jobs()
            if j["inbox"] == inbox and j["state"] == "done" and j["audio_seconds"]
        ]
        if not values:
            continue
        warm = sorted(values[1:]) or values
        factors[model] = {
            "first_with_load": round(values[0], 4),
            "warm_median": round(warm[len(warm) // 2], 4),
            "jobs": len(values),
        }
        say(f"realtime factor {model}: first {values[0]:.3f}, warm median {warm[len(warm) // 2]:.3f}")
    return factors


def _check_idle_unload(check: Check, meter: Meter, names: tuple[str, str]) -> None:
    loaded = meter.worker_mib(f"{names[1]} loaded")
    after = meter.worker_mib("after idle unload")
    started = meter.worker_mib("workers started")
    if loaded is None or after is None or started is None:
        check.expect("idle unload frees memory", False, "the worker's memory could not be read")
        return
    freed, held = loaded - after, loaded - started
    check.expect(
        "idle unload frees memory",
        held > 0 and freed >= 0.5 * held,
        f"worker {started} MiB at start, {loaded} MiB with both models, {after} MiB after idle unload",
    )


def _cancel(args: argparse.Namespace, check: Check, meter: Meter, daemon: Daemon, long_path: Path) -> None:
    before = daemon.worker_pids()
    daemon.drop("a", long_path, "long.wav")

    def transcribing() -> bool:
        job = daemon.job("a", "long.wav")
        return job is not None and job["state"] == "running" and (job["progress"] or 0) > 0

    daemon.wait_for(transcribing, timeout=args.timeout, what="long.wav transcribing")
    meter.take("long clip running", daemon)
    idle_unloads = len(daemon.events("model.unloaded", reason="idle"))
    moved_at = time.monotonic()
    os.rename(daemon.folder("a", "inbox") / "long.wav", daemon.folder("a", "cancel") / "long.wav")

    def cancelled() -> bool:
        job = daemon.job("a", "long.wav")
        return job is not None and job["state"] != "running"

    daemon.wait_for(cancelled, timeout=60, what="long.wav cancelled")
    seconds = time.monotonic() - moved_at
    time.sleep(2.0)
    meter.take("after cancel", daemon)
    job = daemon.job("a", "long.wav") or {}
    killed = bool(daemon.events("worker.killed"))
    same_worker = before == daemon.worker_pids()
    running = meter.worker_mib("long clip running")
    after = meter.worker_mib("after cancel")
    with_model = meter.worker_mib(f"{daemon.inboxes['a']} loaded")
    check.report["cancel"] = {
        "state": job.get("state"),
        "seconds_to_cancelled": round(seconds, 2),
        "worker_killed": killed,
        # The model stays loaded after a cancel (it was just in use).
        "model_kept": len(daemon.events("model.unloaded", reason="idle")) == idle_unloads,
        "same_worker": same_worker,
        "worker_mib_running": running,
        "worker_mib_after": after,
        "worker_mib_model_loaded_idle": with_model,
    }
    check.expect(
        "cancel stops the job",
        job.get("state") == "cancelled",
        f"state {job.get('state')} in {seconds:.1f} s",
    )
    if after is None or with_model is None:
        check.expect("cancel releases the job's memory", False, "the worker's memory could not be read")
        return
    # The worker keeps its model, not the cancelled job's working memory.
    check.expect(
        "cancel releases the job's memory",
        after <= with_model * 1.10 + 64,
        f"worker {running} MiB while running, {after} MiB after the cancel "
        f"({with_model} MiB with the models loaded and idle; killed: {killed})",
    )


def _eviction(
    args: argparse.Namespace,
    check: Check,
    meter: Meter,
    work: Path,
    models: Path,
    names: tuple[str, str],
    clip: Path,
    gpus: list[int],
) -> None:
    """Only one of the two models fits: the second job unloads the first."""
    estimates = _estimates(work / "state" / "jobs.db", names, on_gpu=bool(gpus))
    check.report["estimates_mib"] = {n: _mib(b) for n, b in estimates.items()}
    if len(estimates) < 2:
        check.expect("eviction", False, f"no memory measured for both models: {estimates}")
        return
    big, small = max(estimates.values()), min(estimates.values())
    workers: dict[str, Any] = {}
    if gpus:
        # The worker's own CUDA context will take its share of what is free now.
        context = (meter.device_used_mib("workers started") or 0.0) - (
            meter.device_used_mib("before whisperd") or 0.0
        )
        free = meter.probe.read(gpus[0]).memory_free_bytes / MiB - context
        workers["memory_reserve_mb"] = max(0, int(free - (big + small / 2) / MiB))
    else:
        workers["cpu_memory_budget_mb"] = math.ceil((big + small / 2) / MiB)
    check.report["eviction_settings"] = workers
    inboxes = {"evict-a": names[0], "evict-b": names[1]}
    daemon = Daemon(work / "run2", models, inboxes, {"model_idle_unload_seconds": 0, **workers})
    say(f"eviction run with {workers}")
    daemon.start()
    try:
        for inbox in inboxes:
            daemon.drop(inbox, clip, "one.wav")
            daemon.wait_ended(inbox, ["one.wav"], timeout=args.timeout)
        time.sleep(1.0)
        meter.take("eviction: after the second model", daemon)
    finally:
        daemon.stop()
    events = [(e.get("event"), e.get("model"), e.get("reason")) for e in daemon.events()]
    unloaded = ("model.unloaded", names[0], "pressure")
    loaded_second = ("model.loaded", names[1], None)
    ordered = (
        unloaded in events
        and loaded_second in events
        and events.index(unloaded) < events.index(loaded_second)
    )
    states = [j["state"] for j in daemon.jobs() if j["inbox"] in inboxes]
    no_room = sum("needs about" in str(e.get("error")) for e in daemon.events("job.retry"))
    check.expect(
        "eviction under a tight reserve" if gpus else "eviction under the CPU RAM budget",
        ordered and states == ["done", "done"],
        f"{names[0]} unloaded (pressure) before {names[1]} loaded: {ordered}; jobs {states}; "
        f"retries (no room) {no_room}",
    )


def _estimates(db: Path, names: tuple[str, str], *, on_gpu: bool) -> dict[str, int]:
    """What the workers measured for each model (the calibration kept in the job store)."""
    rows = _query(db, "SELECT model, device_kind, bytes FROM model_memory")
    return {m: int(b) for m, kind, b in rows if m in names and (kind != "cpu") == on_gpu}


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, path)


# --------------------------------------------------------------------------- command line


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("run", help="run the checks (on a GPU machine)")
    check.add_argument("--models", required=True, help="folder holding MODEL.pt")
    check.add_argument("--model", default="tiny.en", help="first model (default tiny.en)")
    check.add_argument("--second-model", help="second model (default: the first again, as MODEL-b)")
    check.add_argument("--clips", help="folder of .wav clips (default: made with espeak-ng)")
    check.add_argument("--clips-per-model", type=int, default=4, help="jobs per model (default 4)")
    check.add_argument("--long-minutes", type=float, default=10.0, help="length of the cancelled clip")
    check.add_argument("--idle-seconds", type=float, default=20.0, help="model_idle_unload_seconds")
    check.add_argument("--timeout", type=float, default=900.0, help="longest wait for a batch of jobs (s)")
    check.add_argument("--allow-cpu", action="store_true", help="without a GPU, run the steps on the CPU")
    check.add_argument("--work", default="/tmp/whisperd-gpu-check", help="scratch folder (emptied first)")
    check.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path")
    clips = commands.add_parser("make-clips", help="write speech clips with espeak-ng")
    clips.add_argument("folder")
    random = commands.add_parser("make-random", help="write random-weight checkpoints with real dimensions")
    random.add_argument("folder")
    random.add_argument("--arch", action="append", required=True, choices=sorted(ARCHES))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "make-clips":
        for path in make_clips(Path(args.folder)):
            say(f"wrote {path}")
        return 0
    if args.command == "make-random":
        make_random(Path(args.folder), args.arch)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
