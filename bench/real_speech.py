"""Word error rate and speed on recordings of real people (tests/data/speech).

Builds recordings the way people make them: utterances of several speakers
chained with pauses of 0.3-1.5 s (seeded, so every run builds the same ones),
and transcribes each with whisperd's engines in this process (the model
warm, one CPU thread, tiny.en), in these modes:

- `alone`: every utterance transcribed on its own (the per-utterance baseline);
- `whole`: the chain as one file, VAD off (the shipped default);
- `vad`: the inbox option `vad = true` (speech regions found by Silero,
  glued end to end and decoded as one stream, times mapped back);
- for faster-whisper also `vad+batch8` (`batch_size = 8`: the batched
  pipeline on whisperd's VAD chunks of up to 30 s, then on the speech its
  first pass left out; no fallback, no conditioning).

WER is taken over all chains together after Whisper's English normaliser
(the references are verbatim; "ill disposed" vs "ill-disposed" counts).
A passage counts as dropped when an utterance's words are missing from the
transcript (word recall below 0.5).

    .venv/bin/python bench/real_speech.py [--chains 8] [--engines openai-whisper,faster-whisper]

Both engines run the same tiny.en (the bundled CTranslate2 model, and its
openai-whisper checkpoint made by `whisperd models import`, as the tests do).

Writes bench/results/real_speech.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the chains are the tests' own
    sys.path.insert(0, str(REPO))

import benchlib as bl  # noqa: E402
import jiwer  # noqa: E402

from tests.real_speech import chain, dropped, normalise, reference, utterances  # noqa: E402
from whisperd.engines.engine import Engine, LoadedModel  # noqa: E402
from whisperd.jobs import DecodeOptions  # noqa: E402
from whisperd.media.decode import SAMPLE_RATE  # noqa: E402


class _Control:
    def progress(self, fraction: float) -> None:
        del fraction

    def checkpoint(self) -> None:
        return None


def engine_for(name: str, models: Path) -> tuple[Engine, LoadedModel]:
    if name == "faster-whisper":
        from whisperd.engines.faster import FasterWhisper

        engine: Engine = FasterWhisper(str(models), cpu_threads=1)
    else:
        from whisperd.engines.openai import OpenAIWhisper, set_cpu_threads

        set_cpu_threads(1)
        engine = OpenAIWhisper(str(models), allow_download=False)
    return engine, engine.load("tiny.en", "cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    pool = utterances()
    built = [chain(pool, seed, args.per_chain) for seed in range(args.chains)]
    results: dict[str, Any] = {}
    for name in args.engines.split(","):
        engine, loaded = engine_for(name, Path(args.models))
        modes: dict[str, DecodeOptions | None] = {
            "alone": None,
            "whole": DecodeOptions(engine=name),
            "vad": DecodeOptions(engine=name, vad=True),
        }
        if name == "faster-whisper":
            modes["vad+batch8"] = DecodeOptions(
                engine=name, vad=True, batch_size=8, temperature=(0.0,), condition_on_previous_text=False
            )
        alone = {
            u.ident: engine.transcribe(loaded, u.audio, DecodeOptions(engine=name), _Control()).text
            for u in pool
        }
        for mode, options in modes.items():
            results[f"{name} {mode}"] = _measure(engine, loaded, built, alone, options)
            print(f"{name:15} {mode:11} {results[f'{name} {mode}']}", flush=True)
        engine.release(loaded)
    return {
        "provenance": bl.provenance(),
        "machine": bl.machine_info(),
        "chains": [[(p.utterance.ident, p.start) for p in placed] for _audio, placed in built],
        "model": "tiny.en",
        "threads": 1,
        "results": results,
    }


def _measure(
    engine: Engine,
    loaded: LoadedModel,
    built: list[tuple[Any, list[Any]]],
    alone: dict[str, str],
    options: DecodeOptions | None,
) -> dict[str, Any]:
    references, hypotheses, seconds, audio_seconds, drops = [], [], 0.0, 0.0, 0
    for audio, placed in built:
        if options is None:
            hypothesis = " ".join(alone[p.utterance.ident] for p in placed)
        else:
            started = time.perf_counter()
            hypothesis = engine.transcribe(loaded, audio, options, _Control()).text
            seconds += time.perf_counter() - started
            audio_seconds += len(audio) / SAMPLE_RATE
        references.append(normalise(reference(placed)))
        hypotheses.append(normalise(hypothesis))
        drops += sum(dropped(p.utterance, hypothesis) for p in placed)
    return {
        "wer": round(jiwer.wer(references, hypotheses), 4),
        "dropped_utterances": drops,
        "utterances": sum(len(placed) for _audio, placed in built),
        "audio_seconds_per_second": round(audio_seconds / seconds, 2) if seconds else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--per-chain", type=int, default=10)
    parser.add_argument("--engines", default="openai-whisper,faster-whisper")
    parser.add_argument(
        "--models", default="", help="models folder with tiny.en.pt (default: the bench's own)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "real_speech.json"))
    args = parser.parse_args()
    args.models = args.models or str(bl.prepare_model())
    bl.write_json(Path(args.out), run(args))


if __name__ == "__main__":
    main()
