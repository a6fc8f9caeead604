"""faster-whisper's own limit: one process loads the CTranslate2 model once
and calls WhisperModel.transcribe on every file in turn (draining each
segment generator), writing one txt line per segment like whisperd does.

Run by compare.py; prints one JSON object (seconds for import, load, loop and
each file) on stdout.

    .venv/bin/python bench/engine_loop_faster.py --model CT2_FOLDER --output-dir DIR
        [--compute-type int8] [--beam-size 1] [--threads N] [--vad] [--batch-size 0] FILE...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time of this process (faster-whisper decodes in-process with PyAV)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a CTranslate2 Whisper folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--language", default="en")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy (whisperd's default)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--vad", action="store_true")
    parser.add_argument("--batch-size", type=int, default=0, help="> 1: the batched pipeline")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    started = time.perf_counter()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    imported = time.perf_counter()
    model = WhisperModel(
        args.model, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads, num_workers=1
    )
    loaded = time.perf_counter()
    cpu_before_loop = cpu_seconds()
    # whisperd's defaults, as its engine passes them (config.py).
    options: dict[str, object] = {
        "language": args.language,
        "beam_size": args.beam_size,
        "vad_filter": args.vad,
        "vad_parameters": {"threshold": 0.5, "min_silence_duration_ms": 2000, "speech_pad_ms": 400},
    }
    if args.batch_size > 1:
        runner = BatchedInferencePipeline(model)
        options.update(batch_size=args.batch_size, temperature=[0.0])
    else:
        runner = model
        options.update(temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], condition_on_previous_text=True)
    per_file = []
    out = Path(args.output_dir)
    for path in args.files:
        before = time.perf_counter()
        segments, _info = runner.transcribe(path, **options)
        lines = [" ".join(segment.text.split()) for segment in segments]
        (out / f"{Path(path).stem}.txt").write_text("".join(f"{x}\n" for x in lines if x), encoding="utf-8")
        per_file.append(time.perf_counter() - before)
    finished = time.perf_counter()
    print(
        json.dumps(
            {
                "import_seconds": imported - started,
                "load_seconds": loaded - imported,
                "loop_seconds": finished - loaded,
                "loop_cpu_seconds": cpu_seconds() - cpu_before_loop,
                "per_file_seconds": per_file,
            }
        )
    )


if __name__ == "__main__":
    main()
