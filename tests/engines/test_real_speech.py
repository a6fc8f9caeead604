"""Both engines on recordings of real people (tests/real_speech.py): ten
utterances of several speakers chained with pauses of 0.3-1.5 s, as one
file. With the shipped decoding (VAD off), with `vad = true`, and with
faster-whisper's batched pipeline (which on its own ended clips early and
dropped 11 of 80 utterances of bench/real_speech.py), nothing anyone said is
dropped and the word error rate stays near what each utterance gets alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jiwer
import pytest

from tests.real_speech import Audio, Utterance, chain, dropped, normalise, reference, utterances
from whisperd.engines.engine import Engine, LoadedModel
from whisperd.jobs import DecodeOptions

SEEDS = (0, 1, 2, 3)


class Control:
    def __init__(self) -> None:
        self.fractions: list[float] = []

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def checkpoint(self) -> None:
        return None


@pytest.fixture(scope="module")
def pool() -> list[Utterance]:
    return utterances()


@pytest.fixture(scope="module", params=["openai-whisper", "faster-whisper"])
def engine(request: pytest.FixtureRequest, models_dir: Path) -> Iterator[tuple[Engine, LoadedModel]]:
    if request.param == "faster-whisper":
        from whisperd.engines.faster import FasterWhisper

        found: Engine = FasterWhisper(str(models_dir), cpu_threads=1)
    else:
        from whisperd.engines.openai import OpenAIWhisper, set_cpu_threads

        set_cpu_threads(1)
        found = OpenAIWhisper(str(models_dir), allow_download=False)
    loaded = found.load("tiny.en", "cpu")
    yield found, loaded
    found.release(loaded)


def text_of(engine: tuple[Engine, LoadedModel], audio: Audio, options: DecodeOptions) -> str:
    found, loaded = engine
    control = Control()
    text = found.transcribe(loaded, audio, options, control).text
    assert control.fractions and control.fractions[-1] == pytest.approx(1.0)
    return text


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("vad", [False, True], ids=["shipped", "vad"])
def test_chained_speakers_lose_nothing(
    engine: tuple[Engine, LoadedModel], pool: list[Utterance], vad: bool
) -> None:
    assert_nothing_lost(engine, pool, DecodeOptions(engine=engine[0].name, vad=vad))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_batched_pipeline_loses_nothing(models_dir: Path, pool: list[Utterance]) -> None:
    from whisperd.engines.faster import FasterWhisper

    found = FasterWhisper(str(models_dir), cpu_threads=1)
    loaded = found.load("tiny.en", "cpu")
    try:
        batched = DecodeOptions(
            engine=found.name, vad=True, batch_size=8, temperature=(0.0,), condition_on_previous_text=False
        )
        assert_nothing_lost((found, loaded), pool, batched)
    finally:
        found.release(loaded)


def assert_nothing_lost(
    engine: tuple[Engine, LoadedModel], pool: list[Utterance], options: DecodeOptions
) -> None:
    name = engine[0].name
    alone = {u.ident: text_of(engine, u.audio, DecodeOptions(engine=name)) for u in pool}
    references, chained, one_by_one = [], [], []
    for seed in SEEDS:
        audio, placed = chain(pool, seed)
        text = text_of(engine, audio, options)
        assert [p.utterance.ident for p in placed if dropped(p.utterance, text)] == [], text
        references.append(normalise(reference(placed)))
        chained.append(normalise(text))
        one_by_one.append(normalise(" ".join(alone[p.utterance.ident] for p in placed)))
    chained_wer, alone_wer = jiwer.wer(references, chained), jiwer.wer(references, one_by_one)
    assert chained_wer <= max(1.25 * alone_wer, alone_wer + 0.02), (chained_wer, alone_wer)
