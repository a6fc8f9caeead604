"""Configuration schema: every key, its type, default and documentation.

Every key whisperd reads is defined (and documented) in the dataclasses
below; a key that is not here is refused with the file and key named
(config_load.py reads and validates files against these definitions). No I/O.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from whisperd.jobs import OUTPUT_FORMATS, DecodeOptions, JobSpec

# OpenCC configs the `chinese` key accepts (file names of OpenCC's bundled configs).
CHINESE_CONFIGS = (
    "s2t",
    "t2s",
    "s2tw",
    "tw2s",
    "s2hk",
    "hk2s",
    "s2twp",
    "tw2sp",
    "t2tw",
    "t2hk",
    "t2jp",
    "jp2t",
)
WATCH_MODES = ("native", "poll")
TASKS = ("transcribe", "translate")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
ENGINES = ("openai-whisper", "faster-whisper")
# CTranslate2 compute types an inbox may ask for ("auto": int8 on CPU, float16 on CUDA).
COMPUTE_TYPES = (
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def _doc(text: str, **checks: Any) -> dict[str, Any]:
    """Field metadata: the key's documentation plus declarative checks
    (choices=..., minimum=..., path=True)."""
    return {"doc": text, **checks}


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    """[daemon]: the daemon process itself."""

    state_dir: str = field(
        default="./var/state", metadata=_doc("Folder for the job database and runtime state.", path=True)
    )
    database_url: str = field(
        default="",
        metadata=_doc(
            "SQLAlchemy URL of the job store. Empty: SQLite file jobs.db in state_dir. "
            "Several hosts share one PostgreSQL table with postgresql+psycopg://USER@HOST/DB."
        ),
    )
    instance: str = field(
        default="",
        metadata=_doc(
            "Name of this daemon among those sharing the job store (worker ids, recovery, logs, "
            "metrics). Empty: the hostname. Two live daemons on one store need different names; "
            "letters, digits, '.', '_' and '-', at most 64."
        ),
    )
    database_busy_timeout_seconds: float = field(
        default=30.0,
        metadata=_doc(
            "How long an SQLite writer waits for another process's write lock before the store counts "
            "as unreachable (whisperd then keeps retrying with backoff; status reports it).",
            minimum=0.001,
        ),
    )
    settle_seconds: float = field(
        default=2.0,
        metadata=_doc("A file is taken once its size and mtime are unchanged this long.", minimum=0.0),
    )
    rescan_seconds: float = field(
        default=60.0,
        metadata=_doc("Rescan every inbox this often to catch lost file events (0: never).", minimum=0.0),
    )
    shutdown_grace_seconds: float = field(
        default=30.0,
        metadata=_doc(
            "On SIGTERM a running job may finish within this time; after it, it goes back to the queue.",
            minimum=0.0,
        ),
    )
    keep_finished_days: float = field(
        default=0.0,
        metadata=_doc(
            "Finished jobs (done, failed, cancelled) older than this many days are deleted from the "
            "store by housekeeping, a few hundred at a time (0: kept forever). Queued and running jobs "
            "are never deleted. A pruned job's output names are free again: the same name dropped "
            "later writes plain-named outputs over its transcript.",
            minimum=0.0,
        ),
    )
    keep_finished_jobs: int = field(
        default=0,
        metadata=_doc(
            "Keep at most this many finished jobs, the newest (0: no limit); the rest are pruned "
            "like those older than keep_finished_days.",
            minimum=0,
        ),
    )
    log_level: str = field(default="info", metadata=_doc("Log level.", choices=LOG_LEVELS))
    log_format: str = field(
        default="auto",
        metadata=_doc("auto: readable on a terminal, JSON lines otherwise (journald).", choices=LOG_FORMATS),
    )


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """[models]: where Whisper models live."""

    folder: str = field(
        default="./var/models",
        metadata=_doc(
            "Folder of imported models (NAME.pt); `whisperd models import` writes here.", path=True
        ),
    )
    engine: str = field(
        default="openai-whisper",
        metadata=_doc("Engine of inboxes that name none: openai-whisper or faster-whisper.", choices=ENGINES),
    )
    default: str = field(default="tiny.en", metadata=_doc("Model used by inboxes that name none."))
    allow_download: bool = field(
        default=False,
        metadata=_doc("Let openai-whisper download a model missing from the folder (needs network)."),
    )


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    """[workers]: the worker pool."""

    devices: str | tuple[int, ...] = field(
        default="auto",
        metadata=_doc('"auto" (every GPU, else the CPU), "cpu", or a list of GPU indexes such as [0, 1].'),
    )
    jobs_per_device: int = field(
        default=1, metadata=_doc("Worker slots per GPU (one rarely gains from more).", minimum=1)
    )
    cpu_slots: int = field(default=1, metadata=_doc("Worker slots when running on the CPU.", minimum=1))
    cpu_threads: int = field(
        default=0,
        metadata=_doc("torch CPU threads per worker (0: the cores divided among the slots).", minimum=0),
    )
    max_attempts: int = field(
        default=3, metadata=_doc("A job that fails (or kills its worker) this often ends failed.", minimum=1)
    )
    lease_seconds: float = field(
        default=60.0,
        metadata=_doc("A running job whose worker is silent this long goes back to the queue.", minimum=1.0),
    )
    heartbeat_seconds: float = field(
        default=2.0, metadata=_doc("How often a worker renews its lease and reports progress.", minimum=0.1)
    )
    cancel_grace_seconds: float = field(
        default=1.0,
        metadata=_doc("A cancelled job's worker that has not stopped after this is killed.", minimum=0.0),
    )
    retry_base_seconds: float = field(
        default=5.0, metadata=_doc("First retry delay; doubles per attempt, with jitter.", minimum=0.0)
    )
    retry_max_seconds: float = field(default=300.0, metadata=_doc("Longest retry delay.", minimum=0.0))
    model_idle_unload_seconds: float = field(
        default=600.0, metadata=_doc("Unload a model unused this long (0: keep).", minimum=0.0)
    )
    memory_reserve_mb: int = field(
        default=512,
        metadata=_doc(
            "GPU memory kept free when deciding whether a model fits, in MiB (2^20 bytes).", minimum=0
        ),
    )
    cpu_memory_budget_mb: int = field(
        default=0,
        metadata=_doc(
            "RAM the models of one CPU worker may use, in MiB (2^20 bytes; 0: no limit); "
            "LRU models are unloaded.",
            minimum=0,
        ),
    )
    cpu_fallback: bool = field(
        default=False,
        metadata=_doc(
            "After CUDA runs out of memory twice on a job (other models unloaded in between), "
            "finish it on the CPU."
        ),
    )
    health_interval_seconds: float = field(
        default=15.0, metadata=_doc("How often devices and workers are health-checked.", minimum=0.1)
    )
    hung_job_min_seconds: float = field(
        default=300.0,
        metadata=_doc(
            "A running job whose progress has not moved this long is killed and retried.", minimum=1.0
        ),
    )
    hung_job_audio_factor: float = field(
        default=2.0,
        metadata=_doc(
            "... or, for long audio, this many times the audio's length (whichever is longer).", minimum=0.0
        ),
    )
    decode_timeout_seconds: float = field(
        default=900.0,
        metadata=_doc("Longest one file's decode (ffmpeg) may take before its job fails.", minimum=1.0),
    )


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint."""

    enabled: bool = field(default=True, metadata=_doc("Serve /metrics."))
    host: str = field(
        default="127.0.0.1",
        metadata=_doc("Address to listen on; loopback unless you mean to expose it (0.0.0.0: all)."),
    )
    port: int = field(default=9310, metadata=_doc("TCP port (0: any free port).", minimum=0, maximum=65535))


@dataclass(frozen=True, kw_only=True)
class InboxConfig:
    """[[inbox]]: one watched folder and what to do with its files.

    output, cancel, done and failed must each be a folder of the inbox's
    own: not empty, not inside the inbox, not shared with another inbox, and
    not the file system root, the home folder, the current folder, the config
    file's folder (or one above it), the state folder or the models folder.
    """

    name: str = field(metadata=_doc("Unique name, used in logs, metrics and job listings."))
    path: str = field(metadata=_doc("Folder to watch (subfolders included).", path=True))
    output: str = field(metadata=_doc("Transcripts go here, subfolders mirrored.", path=True))
    cancel: str = field(metadata=_doc("Move a file here from the inbox to cancel its job.", path=True))
    done: str = field(metadata=_doc("Sources move here after their transcripts are written.", path=True))
    failed: str = field(metadata=_doc("Sources that failed, with NAME.error.txt saying why.", path=True))
    model: str = field(default="", metadata=_doc("Model name; empty: [models] default."))
    language: str = field(default="auto", metadata=_doc('Spoken language code ("en", "zh", ...) or "auto".'))
    task: str = field(
        default="transcribe", metadata=_doc("transcribe, or translate to English.", choices=TASKS)
    )
    formats: tuple[str, ...] = field(
        default=("txt", "srt", "vtt", "json", "tsv"),
        metadata=_doc("Outputs to write: any of txt, srt, vtt, json, tsv.", each_in=OUTPUT_FORMATS),
    )
    chinese: str = field(
        default="",
        metadata=_doc(
            "OpenCC conversion of every text output (t2s, s2t, s2twp...; empty: none).",
            choices=("", *CHINESE_CONFIGS),
        ),
    )
    priority: int = field(default=0, metadata=_doc("Jobs of higher-priority inboxes run first."))
    watch: str = field(
        default="native",
        metadata=_doc("native (inotify) or poll (network file systems).", choices=WATCH_MODES),
    )
    allow_symlinks: bool = field(
        default=False, metadata=_doc("Accept symbolic links (never ones pointing out of the inbox).")
    )
    max_size_mb: float = field(
        default=0.0,
        metadata=_doc("Refuse files larger than this many MB (10^6 bytes; 0: no limit).", minimum=0.0),
    )
    max_duration_seconds: float = field(
        default=0.0, metadata=_doc("Refuse longer audio (0: no limit).", minimum=0.0)
    )
    beam_size: int = field(default=0, metadata=_doc("Beam search width (0: greedy decoding).", minimum=0))
    best_of: int = field(
        default=0,
        metadata=_doc("Candidates when sampling at temperature > 0 (0: whisper's default).", minimum=0),
    )
    temperature: tuple[float, ...] = field(
        default=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        metadata=_doc("Temperatures tried in turn when decoding fails whisper's thresholds."),
    )
    initial_prompt: str = field(default="", metadata=_doc("Text that primes the decoder (names, spelling)."))
    word_timestamps: bool = field(default=False, metadata=_doc("Add word-level timestamps (json output)."))
    condition_on_previous_text: bool = field(
        default=True,
        metadata=_doc("Prompt each window with the previous text (off: fewer repetition loops)."),
    )
    engine: str = field(
        default="",
        metadata=_doc("openai-whisper or faster-whisper; empty: [models] engine.", choices=("", *ENGINES)),
    )
    compute_type: str = field(
        default="auto",
        metadata=_doc(
            "faster-whisper: CTranslate2 compute type (auto: int8 on CPU, float16 on CUDA).",
            choices=COMPUTE_TYPES,
        ),
    )
    batch_size: int = field(
        default=0,
        metadata=_doc("faster-whisper: batched pipeline batch size (0 or 1: sequential).", minimum=0),
    )
    hotwords: str = field(default="", metadata=_doc("faster-whisper: words to bias the decoder towards."))
    vad: bool = field(
        default=False, metadata=_doc("Voice activity detection: transcribe only the speech (Silero VAD).")
    )
    vad_threshold: float = field(
        default=0.5,
        metadata=_doc("VAD: speech probability above which a frame is speech.", minimum=0.0, maximum=1.0),
    )
    vad_min_silence_ms: int = field(
        default=2000, metadata=_doc("VAD: silence this long (ms) splits speech regions.", minimum=0)
    )
    vad_speech_pad_ms: int = field(
        default=400, metadata=_doc("VAD: padding (ms) kept around each speech region.", minimum=0)
    )
    no_speech_threshold: float = field(
        default=0.6,
        metadata=_doc(
            "A window more likely silent than this (and below log_prob_threshold) gives no text.",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    log_prob_threshold: float = field(
        default=-1.0, metadata=_doc("Average log probability below which a window's decoding failed.")
    )
    compression_ratio_threshold: float = field(
        default=2.4,
        metadata=_doc("Text compressing better than this (gzip ratio) is a repetition loop.", minimum=0.0),
    )
    hallucination_silence_threshold: float = field(
        default=0.0,
        metadata=_doc(
            "Needs word_timestamps (refused without): skip silences over this (s) near suspect text (0 off).",
            minimum=0.0,
        ),
    )

    on_done: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Program run when a job of this inbox ends done: an argument list such as "
            '["/usr/local/bin/notify", "--quiet"], run without a shell, the job in WHISPERD_* '
            "environment variables and as JSON on stdin (README: Completion hooks). []: none; an "
            "empty program name is refused.",
            command=True,
        ),
    )
    on_failed: tuple[str, ...] = field(
        default=(),
        metadata=_doc("Like on_done, for a job that ends failed (after its last attempt).", command=True),
    )
    webhook_url: str = field(
        default="",
        metadata=_doc(
            "http:// or https:// URL that gets a POST of the job's JSON (Content-Type application/json) "
            "when a job ends done or failed; any 2xx answer is a delivery. Empty: none."
        ),
    )
    hook_timeout_seconds: float = field(
        default=60.0,
        metadata=_doc(
            "A hook program still running after this long is killed with its whole process group; "
            "a webhook waits this long for the server at each step. Either counts as a failed try.",
            minimum=0.1,
        ),
    )
    hook_attempts: int = field(
        default=5,
        metadata=_doc(
            "Tries per delivery (program or webhook), with doubling waits in between (1 s, 2 s, 4 s... "
            "at most 5 min); then it is given up and recorded as failed.",
            minimum=1,
        ),
    )

    def hook_kinds(self) -> tuple[str, ...]:
        """The completion hooks this inbox has: on_done, on_failed, webhook."""
        configured = {"on_done": bool(self.on_done), "on_failed": bool(self.on_failed)}
        configured["webhook"] = bool(self.webhook_url)
        return tuple(kind for kind, on in configured.items() if on)

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(
            language=None if self.language == "auto" else self.language,
            task=self.task,
            beam_size=self.beam_size or None,
            best_of=self.best_of or None,
            temperature=self.temperature,
            initial_prompt=self.initial_prompt or None,
            word_timestamps=self.word_timestamps,
            condition_on_previous_text=self.condition_on_previous_text,
            engine=self.engine or "openai-whisper",
            compute_type=self.compute_type,
            batch_size=self.batch_size,
            hotwords=self.hotwords or None,
            vad=self.vad,
            vad_threshold=self.vad_threshold,
            vad_min_silence_ms=self.vad_min_silence_ms,
            vad_speech_pad_ms=self.vad_speech_pad_ms,
            no_speech_threshold=self.no_speech_threshold,
            log_prob_threshold=self.log_prob_threshold,
            compression_ratio_threshold=self.compression_ratio_threshold or None,
            hallucination_silence_threshold=self.hallucination_silence_threshold or None,
        )

    def job_spec(self, rel_path: str, default_model: str) -> JobSpec:
        """The spec of a job for a file at rel_path inside this inbox."""
        return JobSpec(
            inbox=self.name,
            inbox_root=self.path,
            rel_path=rel_path,
            model=self.model or default_model,
            options=self.decode_options(),
            formats=self.formats,
            chinese=self.chinese,
            output_dir=self.output,
            cancel_dir=self.cancel,
            done_dir=self.done,
            failed_dir=self.failed,
            priority=self.priority,
            max_size_bytes=int(self.max_size_mb * 1_000_000),  # MB as media/decode.py reports it
            max_duration_seconds=self.max_duration_seconds,
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole effective configuration."""

    # The file it was read from ("" for the built-in defaults).
    source: str = ""
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inboxes: tuple[InboxConfig, ...] = ()

    @property
    def database_url(self) -> str:
        if self.daemon.database_url:
            return self.daemon.database_url
        return "sqlite:///" + os.path.join(self.daemon.state_dir, "jobs.db")

    @property
    def instance(self) -> str:
        """This daemon's instance name: [daemon] instance, else the hostname."""
        return self.daemon.instance or socket.gethostname()

    def inbox(self, name: str) -> InboxConfig | None:
        return next((i for i in self.inboxes if i.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The effective config as TOML-shaped data (for check-config)."""
        data: dict[str, Any] = {}
        for section in ("daemon", "models", "workers", "metrics"):
            data[section] = _plain(dataclasses.asdict(getattr(self, section)))
        data["daemon"]["database_url"] = self.database_url
        data["daemon"]["instance"] = self.instance
        data["inbox"] = [_plain(dataclasses.asdict(i)) for i in self.inboxes]
        return data


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


# The tables of a config file besides [[inbox]], in the order they are read.
SECTIONS: Mapping[str, type[Any]] = {
    "daemon": DaemonConfig,
    "models": ModelsConfig,
    "workers": WorkersConfig,
    "metrics": MetricsConfig,
}
