"""The engine interface: what a worker asks of a Whisper implementation.

Two implementations swap per inbox (`engine` option): openai-whisper on torch
(openai.py) and faster-whisper on CTranslate2 (faster.py). A worker holds one
`Engine` of each kind it has run a job of (workers/model_cache.py builds them
on first use, so a worker that never runs a faster-whisper job never imports
CTranslate2), loads models through it, transcribes with a `JobControl` and
releases what it loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from whisperd.jobs import DecodeOptions, TranscriptResult

# 16 kHz mono float32 samples (media.decode.decode_audio's output).
Audio = np.ndarray[Any, np.dtype[np.float32]]


class JobControl(Protocol):
    """What a running transcription reports to, and may be stopped by
    (workers.job_session.JobSession)."""

    def progress(self, fraction: float) -> None:
        """Called with the fraction of the audio decoded so far (0..1)."""

    def checkpoint(self) -> None:
        """Called often; raises to stop the transcription."""


@dataclass(kw_only=True)
class LoadedModel:
    """A model one worker holds, with what its cache needs to evict it; each
    engine's own kind adds the model object itself."""

    name: str
    # The device it was asked onto ("cpu", "cuda:0").
    device: str
    # Bytes loading it cost (weights; the cache may raise it to what the GPU measured).
    size_bytes: int
    load_seconds: float
    # time.monotonic() of its last use: the idle unload and eviction order.
    last_used: float


class Engine(ABC):
    """One Whisper implementation, in one worker process."""

    # The `engine` option that picks it ("openai-whisper", "faster-whisper").
    name: ClassVar[str]

    @abstractmethod
    def load(self, model: str, device: str, *, compute_type: str = "auto") -> LoadedModel:
        """Load model `model` onto `device`; ModelNotFoundError when no file has it.
        `compute_type` is CTranslate2's ("auto": the device's native one);
        openai-whisper has none and ignores it."""

    @abstractmethod
    def release(self, loaded: LoadedModel) -> None:
        """Give back the memory of a model this engine loaded."""

    @abstractmethod
    def transcribe(
        self, loaded: LoadedModel, audio: Audio, options: DecodeOptions, control: JobControl
    ) -> TranscriptResult:
        """Transcribe `audio` with the inbox's options, reporting progress to
        `control` and stopping when its checkpoint raises."""

    @abstractmethod
    def model_device(self, loaded: LoadedModel) -> str:
        """Where the model's weights really are ("cuda:0", "cpu")."""

    @abstractmethod
    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by load or transcribe, means the device ran out of memory."""

    @abstractmethod
    def gpu_bytes_held(self, device: str) -> int:
        """GPU memory this process holds for this engine on `device` (each
        engine's allocator counts its own)."""

    def compute_type(self, requested: str, device: str) -> str:
        """The concrete compute type a model loaded with `requested` has on
        `device` (part of what a loaded model is kept under); "" where the
        engine has no such choice."""
        del requested, device
        return ""
