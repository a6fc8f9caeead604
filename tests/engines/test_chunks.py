"""VAD chunks (engines/vad.py), as faster-whisper's batched pipeline decodes
them: speech regions packed into chunks of at most 30 s cut at pauses,
speech a decode left out found again, text decoded twice kept once.
test_real_speech.py runs the pipeline on recordings of real people."""

from __future__ import annotations

import itertools

import numpy as np

from whisperd.engines import vad
from whisperd.jobs import Segment, TranscriptResult, Word
from whisperd.media.decode import SAMPLE_RATE


def at(value: float) -> int:
    return round(value * SAMPLE_RATE)


def regions(*spans: tuple[float, float]) -> list[vad.Region]:
    return [vad.Region(at(a), at(b)) for a, b in spans]


def noise(seconds: float, quiet: tuple[float, float] | None = None) -> np.ndarray:
    audio = np.random.default_rng(1).uniform(-0.3, 0.3, at(seconds)).astype(np.float32)
    if quiet is not None:
        audio[at(quiet[0]) : at(quiet[1])] *= 0.001
    return audio


def spans(chunks: list[vad.Chunk]) -> list[tuple[float, float]]:
    return [(c.start / SAMPLE_RATE, c.end / SAMPLE_RATE) for c in chunks]


def segment(start: float, end: float, text: str, words: tuple[Word, ...] = ()) -> Segment:
    return Segment(id=0, start=start, end=end, text=text, avg_logprob=-0.2, no_speech_prob=0.1, words=words)


def result(*segments: Segment, language: str = "en") -> TranscriptResult:
    return TranscriptResult(text="".join(s.text for s in segments), language=language, segments=segments)


# ------------------------------------------------------------------ packing


def test_short_speech_is_one_chunk_from_its_first_to_its_last_region() -> None:
    found = vad.chunks(noise(20), regions((1, 4), (5, 9), (12, 18)))
    assert spans(found) == [(1, 18)] and len(found[0].regions) == 3


def test_a_long_run_is_cut_at_the_longest_pause_in_the_chunks_second_half() -> None:
    # Pauses: 0.5 s at 6 s, 2 s at 18 s, 0.4 s at 28.6 s; 31 s in all.
    found = vad.chunks(noise(40), regions((0, 6), (6.5, 18), (20, 28.6), (29, 31)))
    assert spans(found) == [(0, 18), (20, 31)]


def test_a_cut_never_falls_in_the_first_half_even_at_a_longer_pause() -> None:
    # The 3 s pause at 5 s would leave a 5 s chunk: the 0.5 s one at 26 s is taken.
    found = vad.chunks(noise(60), regions((0, 5), (8, 26), (26.5, 40)))
    assert spans(found) == [(0, 26), (26.5, 40)]


def test_every_chunk_is_at_most_30_seconds_and_every_region_is_in_one() -> None:
    rng = np.random.default_rng(7)
    edges = np.cumsum(rng.uniform(0.2, 6.0, 120))
    found_regions = [vad.Region(at(a), at(b)) for a, b in zip(edges[::2], edges[1::2], strict=False)]
    found = vad.chunks(noise(float(edges[-1]) + 1), found_regions)
    assert all(c.length <= at(vad.MAX_CHUNK_SECONDS) for c in found)
    assert [r for c in found for r in c.regions] == found_regions
    assert all(a.end <= b.start for a, b in itertools.pairwise(found))


def test_a_region_longer_than_a_chunk_is_cut_at_its_quietest_moment() -> None:
    audio = noise(50, quiet=(21.0, 21.3))
    found = vad.chunks(audio, regions((0, 50)))
    assert len(found) == 2 and all(c.length <= at(30) for c in found)
    assert 21.0 <= found[0].end / SAMPLE_RATE <= 21.3
    assert found[0].end == found[1].start  # nothing lost between them


# ------------------------------------------------------------------ mapping


def test_speech_no_segment_covers_is_found() -> None:
    chunk = vad.Chunk(at(0), at(15), tuple(regions((0, 4), (5, 9), (10, 15))))
    decoded = result(segment(0.0, 4.1, " one"), segment(5.2, 8.8, " two"))
    assert [(r.start / SAMPLE_RATE, r.end / SAMPLE_RATE) for r in vad.uncovered(chunk, decoded)] == [(10, 15)]
    # Gaps shorter than a second are timestamp slack, not missed speech.
    assert vad.uncovered(chunk, result(segment(0.3, 4.0, " a"), segment(5.0, 14.4, " b"))) == []


def test_text_decoded_twice_is_kept_once() -> None:
    first = result(segment(0, 6, " Ask not what your country can do for you."))
    kept = vad.merged(first, result(segment(4.5, 6, " for you"), segment(7.0, 9.0, " Ask what you can do.")))
    assert [s.text for s in kept.segments] == [
        " Ask not what your country can do for you.",
        " Ask what you can do.",
    ]
    assert kept.text == " Ask not what your country can do for you. Ask what you can do."


def test_merging_never_drops_what_the_first_pass_heard_nor_words_said_again() -> None:
    """Short answers inside longer words ("no" in "know") and an answer said
    twice are speech, not duplicates: only a second-pass segment that a
    first-pass segment it overlaps already holds, word for word, goes."""
    first = result(segment(0, 2, " I know that."), segment(2.5, 3, " No."), segment(4, 4.5, " Yes."))
    again = result(segment(6, 6.5, " Yes."), segment(7, 8, " No."))
    kept = vad.merged(first, again)
    assert [s.text for s in kept.segments] == [" I know that.", " No.", " Yes.", " Yes.", " No."]
    assert [s.start for s in kept.segments] == [0, 2.5, 4, 6, 7]
    assert [s.id for s in kept.segments] == [0, 1, 2, 3, 4]


def test_a_limit_shorter_than_a_quiet_frame_still_cuts() -> None:
    found = vad.chunks(noise(1.0), regions((0, 1.0)), max_seconds=0.05)
    assert all(c.length <= at(0.05) for c in found)
    assert found[0].start == 0 and found[-1].end == at(1.0)
