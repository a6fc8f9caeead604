"""The faster-whisper engine (CTranslate2): the only module that imports
faster_whisper and ctranslate2 to transcribe.

Imported by worker processes only, the first time a job of an inbox with
`engine = "faster-whisper"` runs; `FasterWhisper` is its `Engine`
(engines/engine.py), the module's functions what it is made of.

faster-whisper's transcribe() returns a generator that decodes one 30-s
window (or, batched, one batch of speech chunks) per step; whisperd drives it
segment by segment, reporting progress (segment end / duration) and calling
the JobControl checkpoint in between, so a cancel lands within one window's
decoding (the pool's kill stays the backstop for a longer one).

No hub is ever asked for anything: models load from a local folder only
(model.bin, config.json, tokenizer.json), and HF_HUB_OFFLINE is set before
faster_whisper is first imported, so a missing file fails instead of fetching.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from whisperd.engines import engine, vad
from whisperd.engines.engine import Audio, Engine, JobControl
from whisperd.errors import ModelNotFoundError
from whisperd.jobs import DecodeOptions, Segment, TranscriptResult, Word
from whisperd.media.decode import SAMPLE_RATE
from whisperd.models import locate as models

# What "auto" means per device kind: int8 is faster-whisper's fast CPU type,
# float16 the native GPU one.
AUTO_COMPUTE_TYPE = {"cpu": "int8", "cuda": "float16"}


@dataclass(kw_only=True)
class LoadedModel(engine.LoadedModel):
    """A faster-whisper model held by one worker. Its size_bytes is the RSS
    growth loading it cost on the CPU (the GPU's is measured by the worker
    through NVML: CTranslate2's allocator is not torch's)."""

    # The compute type the weights were loaded in (never "auto").
    compute_type: str
    # faster_whisper.WhisperModel (or, with batching, shared by the pipeline).
    model: Any
    # Folder the weights came from.
    folder: str


def device_type(device: str) -> tuple[str, int]:
    """CTranslate2's (device, index) for a whisperd device ("cpu", "cuda:1")."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def resolve_compute_type(compute_type: str, device: str) -> str:
    """The concrete CTranslate2 compute type for `device` ("auto" resolved)."""
    if compute_type == "auto":
        return AUTO_COMPUTE_TYPE[device_type(device)[0]]
    return compute_type


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as stream:
        resident_pages = int(stream.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def load_model(
    name: str,
    source: str,
    device: str,
    *,
    compute_type: str = "auto",
    cpu_threads: int = 0,
) -> LoadedModel:
    """Load the CTranslate2 Whisper folder `source` (model `name`) onto a
    device with CTranslate2's threads capped: `cpu_threads` intra-op
    threads, one inter-op worker."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before faster_whisper's first import: never a hub
    from faster_whisper import WhisperModel

    kind, index = device_type(device)
    concrete = resolve_compute_type(compute_type, device)
    before = _rss_bytes()
    started = time.monotonic()
    model = WhisperModel(
        source,
        device=kind,
        device_index=index,
        compute_type=concrete,
        cpu_threads=max(1, cpu_threads),
        num_workers=1,
        local_files_only=True,
    )
    elapsed = time.monotonic() - started
    grown = max(0, _rss_bytes() - before) if kind == "cpu" else 0
    return LoadedModel(
        name=name,
        device=device,
        compute_type=concrete,
        model=model,
        size_bytes=grown,
        load_seconds=elapsed,
        last_used=time.monotonic(),
        folder=source,
    )


def release_model(loaded: LoadedModel) -> None:
    """Drop a model; CTranslate2 frees its weights when the last reference goes."""
    loaded.model.model.unload_model()
    del loaded.model
    gc.collect()


def model_device(loaded: LoadedModel) -> str:
    """Where the weights are: CTranslate2 puts them exactly where asked, or fails."""
    kind = str(loaded.model.model.device)
    return loaded.device if loaded.device.startswith(kind) else kind


def is_out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def transcribe_kwargs(options: DecodeOptions) -> dict[str, Any]:
    """faster-whisper's transcribe() keywords for a job's options (shared by
    the bench's in-process loop, so both run exactly the same decoding)."""
    kwargs: dict[str, Any] = {
        "language": options.language,
        "task": options.task,
        # whisperd's None is greedy; faster-whisper's own default would be 5.
        "beam_size": options.beam_size or 1,
        "temperature": list(options.temperature),
        "initial_prompt": options.initial_prompt,
        "word_timestamps": options.word_timestamps,
        "hotwords": options.hotwords,
        "no_speech_threshold": options.no_speech_threshold,
        "log_prob_threshold": options.log_prob_threshold,
        "compression_ratio_threshold": options.compression_ratio_threshold,
        "vad_filter": options.vad,
        "vad_parameters": {
            "threshold": options.vad_threshold,
            "min_silence_duration_ms": options.vad_min_silence_ms,
            "speech_pad_ms": options.vad_speech_pad_ms,
        },
        "log_progress": False,
    }
    if options.best_of:
        kwargs["best_of"] = options.best_of
    if options.batch_size > 1:
        # The batched pipeline decodes speech chunks independently: it has no
        # conditioning on earlier text, temperature fallback or hallucination
        # skipping (config refuses those with batch_size > 1).
        kwargs["batch_size"] = options.batch_size
    else:
        kwargs["condition_on_previous_text"] = options.condition_on_previous_text
        kwargs["hallucination_silence_threshold"] = options.hallucination_silence_threshold
    return kwargs


def run_segments(
    model: Any,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    options: DecodeOptions,
    clips: list[dict[str, float]] | None = None,
) -> tuple[Any, Any]:
    """faster-whisper's (segment generator, info) for the job's options; the
    batched pipeline decodes `clips` (seconds, whisperd's own VAD chunks) each
    on its own when they are given."""
    kwargs = transcribe_kwargs(options)
    if options.batch_size > 1:
        from faster_whisper import BatchedInferencePipeline

        if clips is not None:
            # VAD once (whisperd's), and timestamps on: what a clip's decode
            # left out is found by them (vad.uncovered).
            kwargs.update(clip_timestamps=clips, vad_filter=False, without_timestamps=False)
        return BatchedInferencePipeline(model).transcribe(audio, **kwargs)  # type: ignore[no-any-return]
    return model.transcribe(audio, **kwargs)  # type: ignore[no-any-return]


def transcribe(
    loaded: LoadedModel,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    options: DecodeOptions,
    control: JobControl,
) -> TranscriptResult:
    """Transcribe 16 kHz mono float32 audio, segment by segment under `control`.

    With `vad`, whisperd first finds the speech regions with the same Silero
    model and thresholds faster-whisper's vad_filter uses (engines/vad.py, a fraction
    of a second per minute): no speech means no text and no model run, as on
    openai-whisper, and the json's vad summary is the same on both engines.
    The batched pipeline decodes those regions (VAD once); the sequential
    decode runs faster-whisper's vad_filter. Segments with no word in them
    (a VAD false alarm) are dropped too."""
    loaded.last_used = time.monotonic()
    control.checkpoint()
    if not options.vad:
        return _decode(loaded, audio, options, control)
    regions = vad.speech_regions(audio, options, control.checkpoint)
    if not regions:
        control.progress(1.0)
        language = options.language or ("" if getattr(loaded.model.model, "is_multilingual", True) else "en")
        return TranscriptResult(text="", language=language, segments=(), vad=vad.summary(()))
    if options.batch_size > 1:
        decoded = _decode_batched(loaded, audio, vad.chunks(audio, regions), options, control)
    else:
        decoded = _decode(loaded, audio, options, control)
    return dataclasses.replace(vad.drop_wordless(decoded), vad=vad.summary(regions))


def _decode_batched(
    loaded: LoadedModel,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    chunks: list[vad.Chunk],
    options: DecodeOptions,
    control: JobControl,
) -> TranscriptResult:
    """The speech regions packed into chunks of up to 30 s (vad.chunks), given
    to the batched pipeline as its clips, several decoded at once; then the
    speech the first pass left out (vad.uncovered: on real recordings the
    pipeline ends a clip after its first utterance now and then, 11 of 80
    utterances in bench/real_speech.py), decoded again as clips of their own."""
    first = _decode(loaded, audio, options, control, clips=_clips(chunks), last=False)
    # A chunk the first pass found nothing in was judged no speech: left alone.
    spoken = [c for c in chunks if any(c.start <= s.start * SAMPLE_RATE < c.end for s in first.segments)]
    missed = [vad.Chunk(r.start, r.end, (r,)) for c in spoken for r in vad.uncovered(c, first)]
    if missed:
        control.checkpoint()
        # In the first pass's language: a second detection on short clips could pick another.
        same_language = dataclasses.replace(options, language=options.language or first.language or None)
        again = _decode(loaded, audio, same_language, _Unreported(control), clips=_clips(missed))
        first = vad.merged(first, again)
    control.progress(1.0)
    return first


def _clips(chunks: list[vad.Chunk]) -> list[dict[str, float]]:
    return [{"start": c.start / SAMPLE_RATE, "end": c.end / SAMPLE_RATE} for c in chunks]


class _Unreported:
    """The control of a pass whose share of the progress is counted already."""

    def __init__(self, control: JobControl) -> None:
        self._control = control

    def progress(self, fraction: float) -> None:
        del fraction

    def checkpoint(self) -> None:
        self._control.checkpoint()


def _decode(
    loaded: LoadedModel,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    options: DecodeOptions,
    control: JobControl,
    *,
    clips: list[dict[str, float]] | None = None,
    last: bool = True,
) -> TranscriptResult:
    """The segments of one pass; `last`: no pass follows, so its end is the job's 100 %."""
    generator, info = run_segments(loaded.model, audio, options, clips)
    duration = max(float(info.duration), 1e-6)
    segments: list[Segment] = []
    try:
        for raw in generator:
            segments.append(to_segment(len(segments), raw))
            control.progress(min(1.0, float(raw.end) / duration))
    finally:
        generator.close()  # a cancel stops the decoding where it is
    if last:
        control.progress(1.0)
    loaded.last_used = time.monotonic()
    return to_result(info.language, segments)


def to_segment(index: int, raw: Any) -> Segment:
    """One faster-whisper segment in openai-whisper's shape (ids from 0)."""
    return Segment(
        id=index,
        seek=int(raw.seek),
        start=float(raw.start),
        end=float(raw.end),
        text=str(raw.text),
        avg_logprob=float(raw.avg_logprob),
        no_speech_prob=float(raw.no_speech_prob),
        compression_ratio=float(raw.compression_ratio),
        temperature=float(raw.temperature or 0.0),
        tokens=tuple(int(t) for t in raw.tokens),
        words=tuple(
            Word(word=str(w.word), start=float(w.start), end=float(w.end), probability=float(w.probability))
            for w in raw.words or ()
        ),
    )


def to_result(language: str, segments: list[Segment]) -> TranscriptResult:
    """The whole transcript; its text is the segments' texts joined, as openai-whisper's is."""
    return TranscriptResult(
        text="".join(s.text for s in segments), language=str(language), segments=tuple(segments)
    )


class FasterWhisper(Engine):
    """faster-whisper on CTranslate2: models from `NAME.ct2/` folders in the
    models folder (or the bundled tiny.en), CTranslate2's threads capped."""

    name = models.FASTER_WHISPER

    def __init__(self, models_folder: str, *, cpu_threads: int) -> None:
        self._models_folder = models_folder
        self._cpu_threads = cpu_threads

    def load(self, model: str, device: str, *, compute_type: str = "auto") -> LoadedModel:
        source = models.ct2_model_folder(self._models_folder, model)
        if source is None:
            raise ModelNotFoundError(model, self._models_folder, self.name)
        return load_model(model, source, device, compute_type=compute_type, cpu_threads=self._cpu_threads)

    def release(self, loaded: engine.LoadedModel) -> None:
        release_model(_own(loaded))

    def transcribe(
        self, loaded: engine.LoadedModel, audio: Audio, options: DecodeOptions, control: JobControl
    ) -> TranscriptResult:
        return transcribe(_own(loaded), audio, options, control)

    def model_device(self, loaded: engine.LoadedModel) -> str:
        return model_device(_own(loaded))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def gpu_bytes_held(self, device: str) -> int:
        # NVML's count for this process: CTranslate2's memory is invisible to torch.
        from whisperd.devices.nvml import NvmlProbe

        probe = NvmlProbe()
        try:
            return probe.read_process_gpu_memory(device_type(device)[1], os.getpid()) or 0
        finally:
            probe.close()

    def compute_type(self, requested: str, device: str) -> str:
        return resolve_compute_type(requested, device)


def _own(loaded: engine.LoadedModel) -> LoadedModel:
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"model {loaded.name} was not loaded by faster-whisper")
    return loaded
