"""Domain types shared by every layer. Stdlib only.

Types are frozen and keyword-only so a job read from the store cannot be
changed behind the store's back: the job store is the only truth about a job.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
TERMINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

OUTPUT_FORMATS = ("txt", "srt", "vtt", "json", "tsv")


@dataclass(frozen=True, kw_only=True)
class FileIdentity:
    """What makes a file the same file: it survives renames and moves within
    one file system, and changes when the file is replaced or rewritten."""

    # st_dev of the file system holding the file.
    device: int
    # st_ino; with device, names the file across renames.
    inode: int
    # Size in bytes when last looked at.
    size: int
    # Modification time in nanoseconds when last looked at.
    mtime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        return cls.from_stat(os.stat(path, follow_symlinks=False))

    def same_file(self, other: FileIdentity) -> bool:
        """Same device and inode: the same file, whatever its name, size or mtime now."""
        return self.device == other.device and self.inode == other.inode

    def same_content(self, other: FileIdentity) -> bool:
        """Same size and mtime: what a copy into the cancel folder keeps."""
        return self.size == other.size and self.mtime_ns == other.mtime_ns


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """openai-whisper decoding options, chosen per inbox."""

    # Spoken language code, or None to detect it.
    language: str | None = None
    # "transcribe" or "translate" (to English).
    task: str = "transcribe"
    # Beam search width; None means greedy decoding.
    beam_size: int | None = None
    # Candidates sampled at non-zero temperature; None uses whisper's default.
    best_of: int | None = None
    # Temperatures tried in turn when decoding fails its thresholds.
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # Text that primes the decoder (names, spelling, style).
    initial_prompt: str | None = None
    # Add word-level timestamps to each segment.
    word_timestamps: bool = False
    # Feed the previous window's text as the prompt of the next one.
    condition_on_previous_text: bool = True
    # The engine that runs the job: "openai-whisper" or "faster-whisper".
    engine: str = "openai-whisper"
    # faster-whisper: CTranslate2 compute type ("auto": int8 on CPU, float16 on CUDA).
    compute_type: str = "auto"
    # faster-whisper: batch size of its batched pipeline (0 or 1: sequential).
    batch_size: int = 0
    # faster-whisper: words to bias the decoder towards (None: none).
    hotwords: str | None = None
    # Voice activity detection (Silero VAD): transcribe only the speech regions.
    vad: bool = False
    # Speech probability above which a frame counts as speech.
    vad_threshold: float = 0.5
    # Silence at least this long (ms) splits speech regions.
    vad_min_silence_ms: int = 2000
    # Padding (ms) kept on both sides of each speech region.
    vad_speech_pad_ms: int = 400
    # A window whose no-speech probability is above this (and whose average
    # log probability is below log_prob_threshold) is treated as silence.
    no_speech_threshold: float | None = 0.6
    # Average log probability below which a window's decoding counts as failed.
    log_prob_threshold: float | None = -1.0
    # gzip compression ratio above which a window's text counts as a repetition loop.
    compression_ratio_threshold: float | None = 2.4
    # With word timestamps: skip silent gaps longer than this (seconds) around a
    # suspected hallucination (None: off).
    hallucination_silence_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["temperature"] = list(self.temperature)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeOptions:
        values = dict(data)
        values["temperature"] = tuple(values.get("temperature", cls.temperature))
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything a worker needs to run a job, fixed when the job is queued,
    so a config reload never changes a job already in the store."""

    # Name of the inbox the file was dropped in.
    inbox: str
    # Absolute path of the inbox root folder.
    inbox_root: str
    # Path of the source relative to inbox_root (subfolders kept in mirrors).
    rel_path: str
    # Model name, looked up in the models folder.
    model: str
    # Decoding options.
    options: DecodeOptions = field(default_factory=DecodeOptions)
    # Output formats to write, a subset of OUTPUT_FORMATS.
    formats: tuple[str, ...] = ("txt", "srt", "vtt", "json")
    # OpenCC config applied to every text output ("" for none).
    chinese: str = ""
    # Absolute folders of the inbox's mirrors.
    output_dir: str = ""
    cancel_dir: str = ""
    done_dir: str = ""
    failed_dir: str = ""
    # Higher runs first.
    priority: int = 0
    # Refuse sources larger than this many bytes (0: no limit).
    max_size_bytes: int = 0
    # Refuse sources longer than this many seconds (0: no limit).
    max_duration_seconds: float = 0.0

    @property
    def source(self) -> str:
        return os.path.join(self.inbox_root, self.rel_path)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = self.options.to_dict()
        data["formats"] = list(self.formats)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        values = dict(data)
        values["options"] = DecodeOptions.from_dict(values.get("options", {}))
        values["formats"] = tuple(values.get("formats", ()))
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job as the store holds it."""

    # Store-assigned id, shown to users (`whisperd cancel ID`).
    id: int
    spec: JobSpec
    # Identity of the source file when it was queued.
    identity: FileIdentity
    state: JobState
    # Claims so far; counted at claim time so a poison file cannot loop.
    attempts: int
    max_attempts: int
    # Epoch seconds before which a retried job is not claimed again (backoff).
    not_before: float
    # Set while running: who holds the job, until when, under which token.
    claim_token: str | None = None
    worker: str | None = None
    device: str | None = None
    lease_expires: float | None = None
    # Epoch seconds.
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    # Why the last attempt failed, or why the job ended as it did.
    last_error: str | None = None
    # Output files written for the job.
    outputs: tuple[str, ...] = ()
    # Fraction of the audio decoded so far, 0..1, and the ETA in seconds.
    progress: float = 0.0
    eta_seconds: float | None = None
    # Length of the decoded audio in seconds, once known.
    audio_seconds: float | None = None
    # Epoch seconds the engine began this attempt (model loaded, audio read),
    # and, once done, the seconds it took: its realtime factor is
    # decoding_seconds / audio_seconds, model load excluded.
    decoding_started_at: float | None = None
    decoding_seconds: float | None = None
    # Set by a cancel while the job runs; the worker stops at its next check.
    cancel_requested: bool = False
    # Where the source went once the job ended ("" if it was gone), and when;
    # None while that move is still owed.
    disposed_to: str | None = None
    disposed_at: float | None = None

    @property
    def source(self) -> str:
        return self.spec.source


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A running job and the token that fences every write about it."""

    job: Job
    token: str


@dataclass(frozen=True, kw_only=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, kw_only=True)
class Segment:
    id: int
    # Offset (in mel frames, 10 ms each) of the 30 s window this segment was decoded in.
    seek: int = 0
    start: float
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: tuple[int, ...] = ()
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, kw_only=True)
class VadSummary:
    """What voice activity detection found in a file."""

    # Speech regions transcribed (0: nothing to transcribe, empty transcript).
    regions: int
    # Their total length in seconds, padding included.
    speech_seconds: float


@dataclass(frozen=True, kw_only=True)
class TranscriptResult:
    """What the engine produced for one file."""

    text: str
    language: str
    segments: tuple[Segment, ...]
    # Set when the inbox's `vad` chose what was transcribed; None with VAD off.
    vad: VadSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """The openai-whisper result shape: text, language, segments."""
        segments = []
        for seg in self.segments:
            item = asdict(seg)
            item["tokens"] = list(seg.tokens)
            if seg.words:
                item["words"] = [asdict(w) for w in seg.words]
            else:
                item.pop("words")
            segments.append(item)
        return {"text": self.text, "language": self.language, "segments": segments}

    @classmethod
    def from_whisper(cls, result: dict[str, Any]) -> TranscriptResult:
        """Build from the dict openai-whisper's transcribe() returns."""
        segments = tuple(
            Segment(
                id=int(s["id"]),
                seek=int(s.get("seek", 0)),
                start=float(s["start"]),
                end=float(s["end"]),
                text=str(s["text"]),
                avg_logprob=float(s.get("avg_logprob", 0.0)),
                no_speech_prob=float(s.get("no_speech_prob", 0.0)),
                compression_ratio=float(s.get("compression_ratio", 0.0)),
                temperature=float(s.get("temperature", 0.0)),
                tokens=tuple(int(t) for t in s.get("tokens", ())),
                words=tuple(
                    Word(
                        word=str(w["word"]),
                        start=float(w["start"]),
                        end=float(w["end"]),
                        probability=float(w.get("probability", 0.0)),
                    )
                    for w in s.get("words", ()) or ()
                ),
            )
            for s in result.get("segments", ())
        )
        return cls(
            text=str(result.get("text", "")), language=str(result.get("language", "")), segments=segments
        )


class AttemptOutcome(enum.StrEnum):
    """How a running attempt ended, as its worker (or the pool, or recovery)
    saw it; the store turns it into the job's next state (store/job_store.py)."""

    # Transcribed and written: the job is done.
    DONE = "done"
    # The file's (or model's) fault: the same thing fails every time, no retry.
    FAILED = "failed"
    # A failed attempt (a crash, a full disk, a bug): queued again with
    # backoff while attempts remain, else failed.
    RETRY = "retry"
    # Stopped because a user cancelled it.
    CANCELLED = "cancelled"
    # Handed back uncounted, not the file's fault: shutdown, a drained or full
    # device, a source that changed under its job.
    RELEASED = "released"


@dataclass(frozen=True, kw_only=True)
class AttemptEnd:
    """Everything the one store transition that ends an attempt needs."""

    outcome: AttemptOutcome
    # Why the attempt did not end done (None when it did).
    error: str | None = None
    # Output files written (done); empty keeps what set_outputs recorded.
    outputs: tuple[str, ...] = ()
    # Seconds the engine decoded (done): the realtime factor of later ETAs.
    decoding_seconds: float | None = None
    # When the engine began (wall clock), if no heartbeat has recorded it yet.
    decoding_started_at: float | None = None
    # Length of the decoded audio in seconds, once known.
    audio_seconds: float | None = None
    # Backoff of a retried attempt: base and cap of the delay, in seconds.
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    # Released because the source changed: the identity to transcribe next time.
    identity: FileIdentity | None = None


def state_after_attempt(job: Job, outcome: AttemptOutcome) -> JobState:
    """The rule of what a running job becomes when its attempt ends, written
    once (the store applies it in the transaction that ends the attempt, and
    to an expired lease): a done job is done; a file's own failure fails it; otherwise a
    requested cancel wins; a released job goes back uncounted; a failed
    attempt goes back while attempts remain."""
    if outcome is AttemptOutcome.DONE:
        return JobState.DONE
    if outcome is AttemptOutcome.FAILED:
        return JobState.FAILED
    if outcome is AttemptOutcome.CANCELLED or job.cancel_requested:
        return JobState.CANCELLED
    if outcome is AttemptOutcome.RELEASED or job.attempts < job.max_attempts:
        return JobState.QUEUED
    return JobState.FAILED
