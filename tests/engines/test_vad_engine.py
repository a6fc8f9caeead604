"""The openai-whisper engine with VAD, in this process with the real tiny.en:
progress and cancel through the VAD stage, no model run on silence, and the
guards reaching whisper under the names it takes."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import SENTENCES, SpeechFactory
from whisperd.errors import JobCancelled
from whisperd.jobs import DecodeOptions
from whisperd.media import decode as media
from whisperd.media.decode import SAMPLE_RATE

RATE = SAMPLE_RATE


class Control:
    """A JobControl that records progress and cancels at a chosen checkpoint."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.fractions: list[float] = []
        self.checkpoints = 0
        self._cancel_at = cancel_at

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def checkpoint(self) -> None:
        self.checkpoints += 1
        if self.checkpoints == self._cancel_at:
            raise JobCancelled("cancelled by the test")


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> Iterator[Any]:
    from whisperd.engines import openai as transcriber

    transcriber.set_cpu_threads(1)
    model = transcriber.load_model("tiny.en", str(models_dir), "cpu")
    yield model
    transcriber.release_model(model)


def test_silence_gives_an_empty_result_without_running_the_model(loaded: Any) -> None:
    from whisperd.engines import openai as transcriber

    control = Control()
    result = transcriber.transcribe(loaded, np.zeros(30 * RATE, np.float32), DecodeOptions(vad=True), control)
    assert (result.text, result.segments, result.language) == ("", (), "en")
    assert result.vad is not None and result.vad.regions == 0
    # The VAD's own checkpoints only: the model's layer hooks never ran.
    assert control.checkpoints == 2
    assert control.fractions == [1.0]


def test_speech_reports_progress_and_a_cancel_in_the_vad_stops_the_job(
    loaded: Any, speech: SpeechFactory
) -> None:
    from whisperd.engines import openai as transcriber

    words = media.decode_audio(str(speech(SENTENCES[3], "fourth")))
    audio = np.concatenate([np.zeros(10 * RATE, np.float32), words])
    control = Control()
    result = transcriber.transcribe(loaded, audio, DecodeOptions(vad=True), control)
    assert result.segments and result.segments[0].start >= 9.0
    assert control.fractions[-1] == 1.0 and control.fractions == sorted(control.fractions)
    assert control.checkpoints > 2, "the model's layer hooks checkpointed too"

    with pytest.raises(JobCancelled):
        transcriber.transcribe(loaded, audio, DecodeOptions(vad=True), Control(cancel_at=1))


def test_every_guard_reaches_whisper_under_a_name_it_takes() -> None:
    import whisper
    from whisper.decoding import DecodingOptions

    from whisperd.engines import openai as transcriber

    options = DecodeOptions(
        word_timestamps=True,
        beam_size=2,
        best_of=3,
        no_speech_threshold=0.5,
        log_prob_threshold=-0.8,
        compression_ratio_threshold=2.0,
        hallucination_silence_threshold=1.5,
        condition_on_previous_text=False,
    )
    kwargs = transcriber.whisper_kwargs(options, fp16=False)
    taken = set(inspect.signature(whisper.transcribe).parameters) | {
        f.name for f in dataclasses.fields(DecodingOptions)
    }
    assert set(kwargs) <= taken
    assert {
        k: kwargs[k]
        for k in (
            "no_speech_threshold",
            "logprob_threshold",
            "compression_ratio_threshold",
            "hallucination_silence_threshold",
            "condition_on_previous_text",
        )
    } == {
        "no_speech_threshold": 0.5,
        "logprob_threshold": -0.8,
        "compression_ratio_threshold": 2.0,
        "hallucination_silence_threshold": 1.5,
        "condition_on_previous_text": False,
    }
