"""Voice activity detection (whisperd/engines/vad.py) on real audio with the real
Silero model, and the mapping of times on the speech-only audio back onto
the original timeline. No Whisper model runs here (test_vad_e2e.py runs the
daemon)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SENTENCES, SpeechFactory
from whisperd.engines import vad
from whisperd.jobs import DecodeOptions, Segment, TranscriptResult, Word
from whisperd.media import decode as media
from whisperd.media.decode import SAMPLE_RATE

RATE = SAMPLE_RATE
VAD_ON = DecodeOptions(vad=True)


def seconds(value: float) -> int:
    return round(value * RATE)


def spoken(speech: SpeechFactory, text: str, name: str) -> np.ndarray:
    return media.decode_audio(str(speech(text, name)))


def onset(audio: np.ndarray) -> float:
    """Where the sound starts (seconds): the first sample above -40 dBFS."""
    return float(np.flatnonzero(np.abs(audio) > 0.01)[0]) / RATE


def silence(duration: float) -> np.ndarray:
    return np.zeros(seconds(duration), dtype=np.float32)


def no_check() -> None:
    return None


# ------------------------------------------------------------- timeline mapping

# Speech from 1-3 s and 10-12.5 s: on the glued audio 0-2 s and 2-4.5 s.
REGIONS = [vad.Region(seconds(1.0), seconds(3.0)), vad.Region(seconds(10.0), seconds(12.5))]


@pytest.mark.parametrize(
    ("glued", "is_end", "original"),
    [
        (0.0, False, 1.0),
        (0.5, False, 1.5),
        (1.999, True, 2.999),
        (2.0, False, 10.0),  # a start on the join: the second region's start
        (2.0, True, 3.0),  # an end on the join: the first region's end
        (3.25, False, 11.25),
        (4.5, True, 12.5),
        (4.9, True, 12.5),  # whisper's times may overrun the audio: kept in the last region
    ],
)
def test_times_on_the_speech_only_audio_map_back_to_the_original(
    glued: float, is_end: bool, original: float
) -> None:
    assert vad.Timeline(REGIONS).original(glued, is_end=is_end) == pytest.approx(original)


def test_segments_words_and_windows_are_moved_onto_the_original_timeline() -> None:
    words = (
        Word(word=" Hello", start=0.2, end=0.8, probability=0.9),
        Word(word=" there.", start=2.1, end=2.6, probability=0.8),
    )
    segment = Segment(
        id=0,
        seek=200,
        start=0.2,
        end=2.6,
        text=" Hello there.",
        avg_logprob=-0.3,
        no_speech_prob=0.1,
        words=words,
    )
    result = TranscriptResult(text=" Hello there.", language="en", segments=(segment,))
    mapped = vad.Timeline(REGIONS).result(result).segments[0]
    assert (mapped.start, mapped.end) == pytest.approx((1.2, 10.6))
    assert [t for w in mapped.words for t in (w.start, w.end)] == pytest.approx([1.2, 1.8, 10.1, 10.6])
    assert mapped.seek == 1000  # the window at 2 s of speech starts at 10 s of audio
    assert (mapped.text, mapped.avg_logprob, mapped.words[1].word) == (" Hello there.", -0.3, " there.")


def test_a_region_cut_by_a_piece_boundary_is_joined_only_across_short_silence() -> None:
    boundary = seconds(120)
    before = [vad.Region(seconds(100), seconds(110)), vad.Region(seconds(115), boundary)]
    join = seconds(2)
    close = vad.join_at_boundary(
        before, [vad.Region(seconds(121), seconds(125))], boundary=boundary, join_below=join
    )
    assert close == [before[0], vad.Region(seconds(115), seconds(125))]
    far = [vad.Region(seconds(123), seconds(125))]
    assert vad.join_at_boundary(before, far, boundary=boundary, join_below=join) == [*before, *far]
    ended = [vad.Region(seconds(100), seconds(110))]  # the speech had ended before the boundary
    after = [vad.Region(boundary, seconds(125))]
    assert vad.join_at_boundary(ended, after, boundary=boundary, join_below=join) == [*ended, *after]


# ------------------------------------------------------------- real Silero VAD


def test_digital_silence_has_no_speech_regions() -> None:
    assert vad.speech_regions(silence(60.0), VAD_ON, no_check) == []


def test_speech_after_silence_is_found_where_it_starts(speech: SpeechFactory) -> None:
    words = spoken(speech, SENTENCES[0], "first")
    audio = np.concatenate([silence(20.0), words, silence(20.0)])
    speech_starts, speech_ends = 20.0 + onset(words), 20.0 + len(words) / RATE
    regions = vad.speech_regions(audio, VAD_ON, no_check)
    assert len(regions) == 1
    pad = VAD_ON.vad_speech_pad_ms / 1000
    assert speech_starts - pad - 0.1 <= regions[0].start / RATE <= speech_starts
    assert speech_ends - 0.5 <= regions[0].end / RATE <= speech_ends + pad + 0.1
    glued = vad.speech_only(audio, regions)
    assert glued.dtype == np.float32 and len(glued) == regions[0].length
    assert vad.summary(regions).speech_seconds == pytest.approx(regions[0].length / RATE)


def test_speech_across_a_piece_boundary_stays_one_region(speech: SpeechFactory) -> None:
    words = spoken(speech, SENTENCES[1], "second")
    # The speech starts 4 s before the VAD's first piece ends and runs past it.
    lead = vad.PIECE_SECONDS - 4.0
    audio = np.concatenate([silence(lead), words, silence(5.0)])
    regions = vad.speech_regions(audio, VAD_ON, no_check)
    assert len(regions) == 1
    assert regions[0].start / RATE < vad.PIECE_SECONDS < regions[0].end / RATE
    assert regions[0].end / RATE >= lead + len(words) / RATE - 0.5


def test_a_longer_silence_splits_regions_and_the_inbox_threshold_decides(speech: SpeechFactory) -> None:
    words = spoken(speech, SENTENCES[2], "third")
    audio = np.concatenate([silence(2.0), words, silence(3.0), words, silence(2.0)])
    assert len(vad.speech_regions(audio, VAD_ON, no_check)) == 2
    patient = DecodeOptions(vad=True, vad_min_silence_ms=5000)
    assert len(vad.speech_regions(audio, patient, no_check)) == 1


class Cancelled(Exception):
    pass


def test_a_cancel_stops_the_vad_between_pieces() -> None:
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        vad.speech_regions(silence(3 * vad.PIECE_SECONDS), VAD_ON, checkpoint)
    assert len(calls) == 2


def test_segments_without_a_word_are_dropped_and_the_rest_renumbered() -> None:
    def segment(n: int, text: str) -> Segment:
        return Segment(id=n, start=n, end=n + 1, text=text, avg_logprob=-0.9, no_speech_prob=0.9)

    result = TranscriptResult(
        text=" . Hello. ...",
        language="en",
        segments=(segment(0, " ."), segment(1, " Hello."), segment(2, " ...")),
    )
    kept = vad.drop_wordless(result)
    assert [(s.id, s.text, s.start) for s in kept.segments] == [(0, " Hello.", 1)]
    assert kept.text == " Hello."
    only_dots = TranscriptResult(text=" .", language="en", segments=(segment(0, " ."),))
    assert vad.drop_wordless(only_dots) == TranscriptResult(text="", language="en", segments=())
