"""The engine's own limit: one process loads the model once and calls
whisper.transcribe on every file in turn, writing txt like the CLI does.

Run by compare.py; prints one JSON object (seconds for import, load, loop and
each file) on stdout.

    .venv/bin/python bench/engine_loop.py --model MODEL.pt --output-dir DIR [--beam-size 5] FILE...
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def cpu_seconds() -> float:
    """CPU time of this process and of the ffmpeg processes it has reaped."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="path of an openai-whisper checkpoint")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--language", default="en")
    parser.add_argument("--beam-size", type=int, default=0, help="0: greedy (whisperd's default)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    started = time.perf_counter()
    import whisper
    from whisper.utils import get_writer

    imported = time.perf_counter()
    model = whisper.load_model(args.model, device="cpu")
    loaded = time.perf_counter()
    cpu_before_loop = cpu_seconds()
    write_txt = get_writer("txt", args.output_dir)
    per_file = []
    for path in args.files:
        before = time.perf_counter()
        # transcribe()'s defaults: greedy decoding, temperature fallback 0.0..1.0.
        beam = {"beam_size": args.beam_size} if args.beam_size else {}
        result = whisper.transcribe(model, path, fp16=False, language=args.language, verbose=None, **beam)
        write_txt(result, path)
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
