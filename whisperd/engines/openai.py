"""The openai-whisper engine: the only module that imports whisper and torch.

It is imported by worker processes only; the daemon process never loads
torch. `OpenAIWhisper` is its `Engine` (engines/engine.py); the module also
has the torch device tools a worker uses whatever its engine (threads, the
canary, free and reserved CUDA memory). Progress and cancel share one seam,
`JobControl`: openai-whisper's
transcribe() has no abort hook, so whisperd listens at two places the engine
already passes through:

- its progress bar (tqdm), updated once per 30-s decoding window, which gives
  where the current window starts, and the decoder's input, whose last token
  is the one just sampled: a timestamp token says how far into the window
  the text decoded so far reaches. Together they give the fraction of the
  audio done as each segment is produced, not once per window (a 20-s clip
  would show 0 % until done);
- a forward pre-hook on the encoder and decoder and on each of their
  residual blocks, run before every window's encoding, every decoded token
  and every layer of either, where a cancel is noticed within one layer's
  compute time: a whole encoder pass takes over a second on a busy CPU (far
  longer with big models), more than the pool's cancel grace period.

The control's `checkpoint()` may raise (JobCancelled, LeaseLost); the
exception unwinds transcribe() and the model stays usable for the next job.

With the inbox's `vad`, whisper sees only the speech regions engines/vad.py finds
(checkpointed too), and their times are mapped back onto the file's timeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import whisper

from whisperd.engines import engine, vad
from whisperd.engines.engine import Audio, Engine, JobControl
from whisperd.errors import ModelNotFoundError
from whisperd.jobs import DecodeOptions, TranscriptResult
from whisperd.models import locate as models


@dataclass(kw_only=True)
class LoadedModel(engine.LoadedModel):
    """An openai-whisper model held by one worker (size_bytes: its weights and buffers)."""

    model: whisper.Whisper


def set_cpu_threads(threads: int) -> None:
    """Cap torch's intra-op threads: an uncapped worker starves its neighbours."""
    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):  # settable only before the first parallel op
        torch.set_num_interop_threads(1)


def resolve_model_file(name: str, folder: str, *, allow_download: bool) -> str:
    """Path of a model's checkpoint (models.model_location: the models folder,
    then whisper's own cache). A name only whisper knows is downloaded if
    allowed; otherwise ModelNotFoundError tells the user how to import it."""
    found = models.model_location(folder, name, models.OPENAI_WHISPER)
    if found is not None:
        return found
    if allow_download and name in whisper._MODELS:
        return name  # whisper.load_model downloads it into download_root
    raise ModelNotFoundError(name, folder)


def load_model(name: str, folder: str, device: str, *, allow_download: bool = False) -> LoadedModel:
    """Load a model onto a device ("cpu", "cuda:0", ...)."""
    target = resolve_model_file(name, folder, allow_download=allow_download)
    started = time.monotonic()
    model = whisper.load_model(target, device=device, download_root=folder)
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    elapsed = time.monotonic() - started
    return LoadedModel(
        name=name,
        device=device,
        model=model,
        size_bytes=size,
        load_seconds=elapsed,
        last_used=time.monotonic(),
    )


def release_model(loaded: LoadedModel) -> None:
    """Drop a model and give its memory back (the caller drops its reference too)."""
    del loaded.model
    gc.collect()
    if loaded.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def empty_cuda_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_kind(device: str) -> str:
    """What memory calibration is keyed by: "cpu", or the GPU's model name."""
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return "cpu"


def cuda_free_bytes(device: str) -> int:
    """Free memory on a CUDA device as the driver sees it (all processes)."""
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def cuda_allocated_bytes(device: str) -> int:
    """Memory this process holds on a CUDA device (tensors plus torch's cache)."""
    return int(torch.cuda.memory_reserved(torch.device(device)))


def model_device(loaded: LoadedModel) -> str:
    """Where the model's weights really are, e.g. "cuda:0" or "cpu"."""
    return str(next(loaded.model.parameters()).device)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def canary(device: str) -> None:
    """A tiny computation on the device: raises if the device is not usable."""
    a = torch.ones((64, 64), device=device)
    value = float((a @ a).sum().item())
    if value != 64.0 * 64 * 64:
        raise RuntimeError(f"canary computation on {device} gave {value}")


def transcribe(
    loaded: LoadedModel,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    options: DecodeOptions,
    control: JobControl,
) -> TranscriptResult:
    """Transcribe 16 kHz mono float32 audio with the given options; with
    `vad`, only its speech regions, on the original timeline."""
    loaded.last_used = time.monotonic()
    if not options.vad:
        result = _run_whisper(loaded, audio, options, control)
    else:
        regions = vad.speech_regions(audio, options, control.checkpoint)
        if regions:
            timeline = vad.Timeline(regions)
            speech = _run_whisper(loaded, vad.speech_only(audio, regions), options, control)
            mapped = vad.drop_wordless(timeline.result(speech))
            result = dataclasses.replace(mapped, vad=vad.summary(regions))
        else:
            result = _no_speech(loaded, options)
    control.progress(1.0)
    loaded.last_used = time.monotonic()
    return result


def _no_speech(loaded: LoadedModel, options: DecodeOptions) -> TranscriptResult:
    """The transcript of audio with no speech in it: no segments, no text."""
    language = options.language or ("" if loaded.model.is_multilingual else "en")
    return TranscriptResult(text="", language=language, segments=(), vad=vad.summary(()))


def whisper_kwargs(options: DecodeOptions, *, fp16: bool) -> dict[str, Any]:
    """openai-whisper's transcribe() arguments for the inbox's options."""
    kwargs: dict[str, Any] = {
        "temperature": options.temperature,
        "condition_on_previous_text": options.condition_on_previous_text,
        "initial_prompt": options.initial_prompt,
        "word_timestamps": options.word_timestamps,
        "language": options.language,
        "task": options.task,
        "fp16": fp16,
        # The guards against text from nothing (None switches one off).
        "no_speech_threshold": options.no_speech_threshold,
        "logprob_threshold": options.log_prob_threshold,
        "compression_ratio_threshold": options.compression_ratio_threshold,
    }
    if options.hallucination_silence_threshold is not None:
        kwargs["hallucination_silence_threshold"] = options.hallucination_silence_threshold
    if options.beam_size:
        kwargs["beam_size"] = options.beam_size
    if options.best_of:
        kwargs["best_of"] = options.best_of
    return kwargs


def _run_whisper(
    loaded: LoadedModel,
    audio: np.ndarray[Any, np.dtype[np.float32]],
    options: DecodeOptions,
    control: JobControl,
) -> TranscriptResult:
    kwargs = whisper_kwargs(options, fp16=loaded.device.startswith("cuda"))
    with _controlled(loaded.model, control), torch.inference_mode():
        # verbose=None keeps whisper from printing to stdout (our logs).
        result = whisper.transcribe(loaded.model, audio, verbose=None, **kwargs)
    return TranscriptResult.from_whisper(result)


@contextlib.contextmanager
def _controlled(model: whisper.Whisper, control: JobControl) -> Iterator[None]:
    """Install the progress/cancel seam around one transcribe() call."""
    module = importlib.import_module("whisper.transcribe")
    tracker = _WindowProgress(_timestamp_begin(model), control.progress)

    def before_forward(_module: torch.nn.Module, _inputs: Any) -> None:
        control.checkpoint()

    def before_decoder(_module: torch.nn.Module, inputs: Any) -> None:
        tracker.sampled(inputs[0])

    checkpointed = [model.encoder, *model.encoder.blocks, model.decoder, *model.decoder.blocks]
    hooks = [layer.register_forward_pre_hook(before_forward) for layer in checkpointed]
    hooks.append(model.decoder.register_forward_pre_hook(before_decoder))
    original = getattr(module, "tqdm")  # noqa: B009 - the attribute is swapped, not just read
    setattr(module, "tqdm", _ProgressBarModule(tracker))  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "tqdm", original)  # noqa: B010
        for hook in hooks:
            hook.remove()


def _timestamp_begin(model: whisper.Whisper) -> int:
    """The id of the first timestamp token (<|0.00|>) of the model's vocabulary."""
    from whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    return int(tokenizer.timestamp_begin)


# whisper's decoding window, in mel frames (30 s), and one timestamp token's
# step, in frames (0.02 s).
_WINDOW_FRAMES = 3000
_FRAMES_PER_TIMESTAMP = 2


class _WindowProgress:
    """The fraction of the audio decoded: the frames of the windows done (from
    the progress bar) plus how far into the current window the latest sampled
    timestamp token reaches. A fallback that decodes a window again at
    another temperature may point earlier; JobControl keeps the maximum."""

    def __init__(self, timestamp_begin: int, report: Callable[[float], None]) -> None:
        self._timestamp_begin = timestamp_begin
        self._report = report
        self._total = 1
        self._done = 0

    def start(self, total_frames: int) -> None:
        self._total = max(1, total_frames)

    def windows_done(self, frames: int) -> None:
        self._done = min(self._total, self._done + frames)
        self._report(self._done / self._total)

    def sampled(self, tokens: torch.Tensor) -> None:
        """Called before each decoder pass with its input tokens: the last
        one of each sequence is the one just sampled (or, on a window's first
        pass, the end of its prompt, which is never a timestamp)."""
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.ndim != 2 or tokens.shape[-1] == 0:
            return
        position = int(tokens[:, -1].max().item()) - self._timestamp_begin
        if position <= 0:
            return
        window = min(_WINDOW_FRAMES, self._total - self._done)
        reached = min(window, position * _FRAMES_PER_TIMESTAMP)
        self._report((self._done + reached) / self._total)


class _ProgressBarModule:
    """Stands in for the `tqdm` module inside whisper.transcribe."""

    def __init__(self, tracker: _WindowProgress) -> None:
        self._tracker = tracker

    def tqdm(self, *, total: int, **_ignored: Any) -> _ProgressBar:
        self._tracker.start(total)
        return _ProgressBar(self._tracker)


class _ProgressBar:
    """The subset of tqdm whisper uses: a context manager with update(n)."""

    def __init__(self, tracker: _WindowProgress) -> None:
        self._tracker = tracker

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        self._tracker.windows_done(n)


class OpenAIWhisper(Engine):
    """openai-whisper on torch: checkpoints from the models folder, then
    whisper's download cache (and a download, where allowed)."""

    name = models.OPENAI_WHISPER

    def __init__(self, models_folder: str, *, allow_download: bool) -> None:
        self._models_folder = models_folder
        self._allow_download = allow_download

    def load(self, model: str, device: str, *, compute_type: str = "auto") -> LoadedModel:
        del compute_type  # torch runs the checkpoint's own precision (fp16 on a GPU)
        return load_model(model, self._models_folder, device, allow_download=self._allow_download)

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
        return cuda_allocated_bytes(device)


def _own(loaded: engine.LoadedModel) -> LoadedModel:
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"model {loaded.name} was not loaded by openai-whisper")
    return loaded
