"""whisperd before and after a change, in one run on one machine.

Both daemons run from this repository: "before" is the `whisperd` package as
it was at a git revision (`git archive`, as compare.py's --whisperd-rev), and
"after" this checkout (or another revision). Each round runs, in rotating
order, the engine's own loop (the control: it shows how busy the machine was
in that round), the "before" daemon and the "after" daemon, each warm
(model loaded, drop to last source in done/, short settle) on the same clips
with the same options as compare.py. The ratio is taken per round, so load
that changes between rounds cancels out.

    .venv/bin/python bench/before_after.py --before 39f2bae [--after REV] [--rounds 3]

Writes bench/results/before_after.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl
from compare import run_engine, run_whisperd

VARIANTS = ("engine", "before", "after")


def one_round(
    index: int,
    clips: list[Path],
    models_dir: Path,
    sources: dict[str, Path | None],
    work: Path,
    settle: float,
) -> dict[str, dict[str, Any]]:
    turn = index % len(VARIANTS)
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS[turn:] + VARIANTS[:turn]:
        folder = work / f"round{index}" / variant
        folder.mkdir(parents=True)
        others = bl.ForeignLoad()
        if variant == "engine":
            results[variant] = run_engine(clips, models_dir / f"{bl.MODEL_NAME}.pt", folder)
        else:
            results[variant] = run_whisperd(clips, models_dir, folder, settle, sources[variant])
        results[variant]["foreign_cores"] = round(others.cores(), 3)
        bl.say(f"round {index}: {variant}: {results[variant]['seconds']:.2f} s")
    return results


def analyse(rounds: list[dict[str, dict[str, Any]]], audio_seconds: float) -> dict[str, Any]:
    def series(variant: str, key: str = "seconds") -> list[float]:
        return [r[variant][key] for r in rounds]

    def paired(numerator: list[float], denominator: list[float]) -> dict[str, float]:
        # Throughput ratio per round: the numerator's time over the denominator's.
        return bl.summary([a / b for a, b in zip(numerator, denominator, strict=True)])

    return {
        "wall_seconds": {v: bl.summary(series(v)) for v in VARIANTS},
        "audio_seconds_per_second": {v: bl.summary([audio_seconds / s for s in series(v)]) for v in VARIANTS},
        "busy_seconds": {v: bl.summary(series(v, "busy_seconds")) for v in ("before", "after")},
        "throughput_after_vs_before": paired(series("before"), series("after")),
        "busy_throughput_after_vs_before": paired(
            series("before", "busy_seconds"), series("after", "busy_seconds")
        ),
        "before_vs_engine_loop": paired(series("engine"), series("before")),
        "after_vs_engine_loop": paired(series("engine"), series("after")),
        "foreign_cores_max": max(r[v]["foreign_cores"] for r in rounds for v in VARIANTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="git revision whose whisperd package is 'before'")
    parser.add_argument("--after", default=None, help="git revision for 'after' (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after a warm-up round")
    parser.add_argument("--clips", type=int, default=8, help="number of clips (5-15 s each)")
    parser.add_argument("--settle", type=float, default=0.3, help="settle_seconds of both daemons")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    bl.add_run_arguments(parser, out_name="before_after.json")
    args = parser.parse_args()
    sources = {"before": bl.whisperd_source(args.before), "after": bl.whisperd_source(args.after)}

    models_dir = bl.prepare_model()
    clips = bl.sentence_clips(args.clips)
    audio_seconds = sum(bl.wav_seconds(c) for c in clips)
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    machine = bl.machine_info()
    work = Path(tempfile.mkdtemp(prefix="whisperd-before-after-"))
    started = time.time()
    try:
        bl.say("warm-up round (not counted)")
        one_round(0, clips, models_dir, sources, work / "warm-up", args.settle)
        rounds = [
            one_round(i, clips, models_dir, sources, work, args.settle) for i in range(1, args.rounds + 1)
        ]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "before_after",
        "duration_seconds": round(time.time() - started, 1),
        "machine": machine,
        "quiet_wait": quiet,
        "before": args.before,
        "after": args.after or "this checkout",
        "settle_seconds": args.settle,
        "clips": {"count": len(clips), "audio_seconds": round(audio_seconds, 2)},
        "analysis": analyse(rounds, audio_seconds),
        "rounds": rounds,
    }
    bl.write_json(args.out, report)
    print(json.dumps(report["analysis"], indent=2))
    bl.say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
