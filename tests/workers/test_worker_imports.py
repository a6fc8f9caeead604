"""What an openai-whisper worker loads: faster-whisper's stack (CTranslate2
with its own OpenMP runtime, PyAV) only where a job needs it. Loaded in every
worker it cost ~2 s of start-up, ~40 MB and a seventh of the torch engine's
throughput on a 2-core machine (bench/before_after.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from whisperd.engines import vad
from whisperd.jobs import DecodeOptions

HEAVY = ("faster_whisper", "ctranslate2", "av", "onnxruntime")


def loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [name for name in run.stdout.strip().split(",") if name]


def test_the_torch_engine_and_worker_load_without_faster_whisper() -> None:
    probe = (
        "from whisperd.engines import engine, openai\n"
        "from whisperd.workers import model_cache, worker\n"
        "from whisperd.daemon import root\n"
        "from whisperd.cli import commands"
    )
    assert loaded_after(probe) == []


def test_vad_loads_faster_whisper_when_it_first_runs() -> None:
    code = (
        "import numpy as np\n"
        "from whisperd.engines import vad\n"
        "from whisperd.jobs import DecodeOptions\n"
        "assert 'faster_whisper' not in sys.modules\n"
        "vad.speech_regions(np.zeros(16000, dtype=np.float32), DecodeOptions(vad=True), lambda: None)"
    )
    assert "faster_whisper" in loaded_after(code)


def test_vad_finds_no_speech_in_silence() -> None:
    silence = np.zeros(3 * 16000, dtype=np.float32)
    assert vad.speech_regions(silence, DecodeOptions(vad=True), lambda: None) == []
