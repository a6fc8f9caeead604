"""Voice activity detection: speech regions for both engines, and the chunks
faster-whisper's batched pipeline decodes them in.

Imported by worker processes only. The Silero VAD model that ships inside
the faster-whisper package (run by onnxruntime, through faster_whisper.vad)
finds the speech regions of a 16 kHz float32 array; openai-whisper then
transcribes only those regions, glued end to end, and every segment and
word timestamp is mapped back onto the original timeline so subtitles line
up with the audio. Audio with no speech region gives no text at all, and the
model never runs: whisper's classic "you" on silence never gets a chance.

The VAD runs over the audio in pieces of PIECE_SECONDS with a cancel
checkpoint between them (an hour of audio takes several seconds here); a
region cut by a piece boundary is joined again when the silence across the
boundary is shorter than the inbox's vad_min_silence_ms.

What whisper makes of a region that is not speech after all (noise loud
enough to fool the VAD) is mostly stopped by its own no-speech guard; the
rest is a segment with no word in it, dropped here (drop_wordless).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from whisperd.jobs import DecodeOptions, Segment, TranscriptResult, VadSummary, Word
from whisperd.media.decode import SAMPLE_RATE

# Silero scores windows of 512 samples; pieces are a whole number of them.
_WINDOW = 512
PIECE_SECONDS = 120
_PIECE_SAMPLES = (PIECE_SECONDS * SAMPLE_RATE // _WINDOW) * _WINDOW
# Mel frames per second (a segment's seek is counted in them).
_FRAMES_PER_SECOND = 100

Audio = np.ndarray[Any, np.dtype[np.float32]]

if TYPE_CHECKING:
    from faster_whisper.vad import VadOptions


@dataclass(frozen=True)
class Region:
    """Speech from sample `start` (inclusive) to `end` (exclusive) of the original audio."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def vad_options(options: DecodeOptions) -> VadOptions:
    # faster_whisper is imported only where VAD runs: importing it loads
    # CTranslate2 (with an OpenMP runtime of its own) and PyAV, ~2 s and
    # ~40 MB in every openai-whisper worker, and slowed torch's decoding.
    from faster_whisper.vad import VadOptions

    return VadOptions(
        threshold=options.vad_threshold,
        min_silence_duration_ms=options.vad_min_silence_ms,
        speech_pad_ms=options.vad_speech_pad_ms,
    )


def speech_regions(audio: Audio, options: DecodeOptions, checkpoint: Callable[[], None]) -> list[Region]:
    """The speech regions of 16 kHz mono audio, in order, never overlapping."""
    from faster_whisper.vad import get_speech_timestamps

    settings = vad_options(options)
    join_below = options.vad_min_silence_ms * SAMPLE_RATE // 1000
    regions: list[Region] = []
    for offset in range(0, len(audio), _PIECE_SAMPLES):
        checkpoint()
        piece = audio[offset : offset + _PIECE_SAMPLES]
        found = get_speech_timestamps(piece, settings, sampling_rate=SAMPLE_RATE)
        pieces = [Region(offset + int(r["start"]), offset + int(r["end"])) for r in found]
        regions = join_at_boundary(regions, pieces, boundary=offset, join_below=join_below)
    checkpoint()
    return regions


def join_at_boundary(
    before: list[Region], after: Sequence[Region], *, boundary: int, join_below: int
) -> list[Region]:
    """before + after, where the last region before a piece boundary that runs
    up to it is joined with the first one after when the silence between them
    is shorter than join_below samples (in one piece they were one region)."""
    if not before or not after:
        return [*before, *after]
    last, first = before[-1], after[0]
    if last.end >= boundary and first.start - last.end < join_below:
        return [*before[:-1], Region(last.start, max(last.end, first.end)), *after[1:]]
    return [*before, *after]


def speech_only(audio: Audio, regions: Sequence[Region]) -> Audio:
    """The regions' samples glued end to end."""
    return np.concatenate([audio[r.start : r.end] for r in regions]).astype(np.float32, copy=False)


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def drop_wordless(result: TranscriptResult) -> TranscriptResult:
    """result without segments that hold no letter or digit. On a VAD false
    alarm (a burst of noise taken for speech) tiny.en's answer is a lone " ."
    whose average log probability sits just above log_prob_threshold, so the
    no-speech guard lets it through: as a subtitle it is a dot shown for the
    length of the noise."""
    kept = [s for s in result.segments if has_words(s.text)]
    if len(kept) == len(result.segments):
        return result
    segments = tuple(replace(s, id=n) for n, s in enumerate(kept))
    return replace(result, text="".join(s.text for s in segments), segments=segments)


def summary(regions: Sequence[Region]) -> VadSummary:
    return VadSummary(regions=len(regions), speech_seconds=sum(r.length for r in regions) / SAMPLE_RATE)


class Timeline:
    """Maps times on the glued speech-only audio back to the original audio."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self._original_starts: list[float] = []
        self._glued_starts: list[float] = []
        self._glued_ends: list[float] = []
        glued = 0
        for region in regions:
            self._original_starts.append(region.start / SAMPLE_RATE)
            self._glued_starts.append(glued / SAMPLE_RATE)
            glued += region.length
            self._glued_ends.append(glued / SAMPLE_RATE)

    def original(self, seconds: float, *, is_end: bool = False) -> float:
        """The original time of `seconds` on the glued audio. A time exactly on
        a join belongs to the region it starts, or (is_end) to the one it ends,
        so a segment ending at a join does not stretch over the silence after it."""
        if not self._glued_starts:
            return seconds
        if is_end:
            index = bisect.bisect_left(self._glued_ends, seconds)
        else:
            index = bisect.bisect_right(self._glued_starts, seconds) - 1
        index = min(max(index, 0), len(self._glued_starts) - 1)
        offset = seconds - self._glued_starts[index]
        # Whisper's times may run a little past the audio's end: keep them in their region.
        offset = min(max(offset, 0.0), self._glued_ends[index] - self._glued_starts[index])
        return round(self._original_starts[index] + offset, 3)

    def segment(self, segment: Segment) -> Segment:
        start = self.original(segment.start)
        end = max(self.original(segment.end, is_end=True), start)
        seek = round(self.original(segment.seek / _FRAMES_PER_SECOND) * _FRAMES_PER_SECOND)
        words = tuple(self.word(word) for word in segment.words)
        return replace(segment, seek=seek, start=start, end=end, words=words)

    def word(self, word: Word) -> Word:
        start = self.original(word.start)
        return replace(word, start=start, end=max(self.original(word.end, is_end=True), start))

    def result(self, result: TranscriptResult) -> TranscriptResult:
        return replace(result, segments=tuple(self.segment(s) for s in result.segments))


# ------------------------------------------------------------------ chunks ---

# The longest stretch of audio decoded on its own: Whisper's window.
MAX_CHUNK_SECONDS = 30
# A long region is cut at its quietest frame of this many samples (20 ms).
_QUIET_FRAME = SAMPLE_RATE // 50


@dataclass(frozen=True)
class Chunk:
    """A stretch of the original audio decoded on its own: from its first
    speech region's start to its last one's end, the pauses between them kept."""

    start: int
    end: int
    regions: tuple[Region, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def chunks(audio: Audio, regions: Sequence[Region], *, max_seconds: float = MAX_CHUNK_SECONDS) -> list[Chunk]:
    """The speech regions packed, in order, into chunks of at most
    `max_seconds` each. A chunk that must be closed is cut at the longest
    pause in its second half (else before the region that does not fit), so
    an utterance is never split between two chunks while a pause can take the
    cut; a region longer than a chunk is cut at its quietest frames."""
    limit = int(max_seconds * SAMPLE_RATE)
    pending = [piece for region in regions for piece in _split_long(audio, region, limit)]
    found: list[Chunk] = []
    while pending:
        taken = _fits(pending, limit)
        found.append(Chunk(taken[0].start, taken[-1].end, tuple(taken)))
        pending = pending[len(taken) :]
    return found


def _fits(pending: Sequence[Region], limit: int) -> list[Region]:
    """The regions that make the next chunk: as many as fit in `limit`, cut
    back to the longest pause in the chunk's second half when more follow."""
    start = pending[0].start
    count = 1
    while count < len(pending) and pending[count].end - start <= limit:
        count += 1
    if count == len(pending):
        return list(pending)
    # Pauses after region i (i < count - 1 stay inside; i == count - 1 is the pause before the overflow).
    candidates = [i for i in range(count) if pending[i].end - start >= limit // 2]
    if not candidates:
        return list(pending[:count])
    cut = max(candidates, key=lambda i: (pending[i + 1].start - pending[i].end, i))
    return list(pending[: cut + 1])


def _split_long(audio: Audio, region: Region, limit: int) -> list[Region]:
    """`region` cut into pieces of at most `limit` samples, each cut at the
    quietest 20 ms frame of the second half of what is left."""
    pieces: list[Region] = []
    start = region.start
    while region.end - start > limit:
        low, high = start + limit // 2, start + limit - _QUIET_FRAME
        if high - low < _QUIET_FRAME:  # a limit too short to look for a quiet moment in
            pieces.append(Region(start, start + limit))
            start += limit
            continue
        frames = audio[low:high][: (high - low) // _QUIET_FRAME * _QUIET_FRAME]
        energy = np.square(frames.reshape(-1, _QUIET_FRAME)).mean(axis=1)
        cut = low + int(np.argmin(energy)) * _QUIET_FRAME + _QUIET_FRAME // 2
        pieces.append(Region(start, cut))
        start = cut
    pieces.append(Region(start, region.end))
    return pieces


# A stretch of a chunk's speech no segment covers is decoded again on its
# own when it is at least this long: Whisper sometimes ends a window early
# (its last timestamp alone), and the speech after that point would be lost.
MISSED_SPEECH_SECONDS = 1.0


def uncovered(
    chunk: Chunk, result: TranscriptResult, *, min_seconds: float = MISSED_SPEECH_SECONDS
) -> list[Region]:
    """The stretches of `chunk`'s speech regions that no segment of `result`
    (on the original timeline) covers, each at least `min_seconds` long."""
    shortest = int(min_seconds * SAMPLE_RATE)
    covered = sorted((int(s.start * SAMPLE_RATE), int(s.end * SAMPLE_RATE)) for s in result.segments)
    missed: list[Region] = []
    for region in chunk.regions:
        position = region.start
        for start, end in covered:
            if end <= position or start >= region.end:
                continue
            if start - position >= shortest:
                missed.append(Region(position, start))
            position = max(position, end)
        if region.end - position >= shortest:
            missed.append(Region(position, region.end))
    return missed


def merged(first: TranscriptResult, again: TranscriptResult) -> TranscriptResult:
    """A first pass and the decode of what it left out (both on the original
    timeline) as one transcript, segments in time order and numbered from 0
    (in the first pass's language). A segment of the
    second pass is dropped when a first-pass segment it overlaps in time
    already holds its words in that order (speech decoded twice is kept
    once); the first pass is never changed."""
    kept = list(first.segments)
    for segment in again.segments:
        words = _words(segment.text)
        overlapping = [s for s in first.segments if s.start < segment.end and segment.start < s.end]
        if words and any(_holds(_words(s.text), words) for s in overlapping):
            continue
        kept.append(segment)
    kept.sort(key=lambda s: (s.start, s.end))
    segments = tuple(replace(s, id=n) for n, s in enumerate(kept))
    return replace(first, text="".join(s.text for s in segments), segments=segments)


def _holds(words: list[str], part: list[str]) -> bool:
    """Whether `part` stands in `words` as a run of whole words."""
    return any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1))


def _words(text: str) -> list[str]:
    found = ("".join(ch for ch in word if ch.isalnum()) for word in text.lower().split())
    return [word for word in found if word]


# Decodes one piece of audio in the given language (None: detect it) under a control.
