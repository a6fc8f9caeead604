"""The models one worker process keeps loaded.

Keyed by engine, model name and compute type; least recently used first,
within the device's free memory (GPU) or the RAM budget (CPU). Imported only
by workers/worker.py; reports loads and unloads to the pool through the slot channel.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from whisperd import logs
from whisperd.engines.engine import Engine, LoadedModel
from whisperd.errors import NoRoomOnDevice, WhisperdError
from whisperd.events import ModelLoaded, ModelsLoaded, ModelUnloaded
from whisperd.jobs import DecodeOptions
from whisperd.workers.channel import SlotChannel, WorkerSettings, put_event

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.workers.worker")


def return_freed_memory() -> None:
    """Hand the memory a finished (or cancelled) job freed back to the OS.

    glibc keeps freed heap for reuse, so without this an idle worker holds on
    to its last job's buffers (tens of MB for tiny on a long clip, far more
    with large models) and its RSS wanders from job to job. malloc_trim takes
    milliseconds; where it does not exist (musl) the memory simply stays."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


# Memory a model needs, from openai-whisper's README table (GB of VRAM), used
# until whisperd has measured the model on that kind of device.
README_MEMORY_GB = {"tiny": 1, "base": 1, "small": 2, "medium": 5, "large": 10, "turbo": 6}


def readme_estimate_bytes(name: str) -> int | None:
    base = name.split(".", maxsplit=1)[0].lower()
    if "turbo" in base:
        return README_MEMORY_GB["turbo"] * 2**30
    for key, gigabytes in README_MEMORY_GB.items():
        if base == key or base.startswith(key + "-"):
            return gigabytes * 2**30
    return None


@dataclass(frozen=True, kw_only=True)
class ModelKey:
    """What a loaded model is kept under: one model name may be loaded by
    both engines, and by faster-whisper in several compute types."""

    engine: str
    name: str
    # The concrete CTranslate2 type ("" for openai-whisper).
    compute_type: str = ""

    @property
    def label(self) -> str:
        """The name in logs, metrics and the store's memory records: the bare
        model name for openai-whisper, as before there were two engines."""
        if self.engine == "openai-whisper":
            return self.name
        return f"{self.name}@{self.engine}:{self.compute_type}"


class ModelCache:
    """The models one worker keeps loaded, least recently used first, within
    the device's free memory (GPU) or the RAM budget (CPU)."""

    def __init__(self, settings: WorkerSettings, channel: SlotChannel, store: JobStore) -> None:
        from whisperd.engines import openai as transcriber

        self._transcriber = transcriber
        self._settings = settings
        self._channel = channel
        self._store = store
        self._models: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._engines: dict[str, Engine] = {}
        self.on_gpu = settings.device.startswith("cuda")
        self._kind = transcriber.device_kind(settings.device)

    def engine(self, name: str) -> Engine:
        """The engine a job's `engine` option names, built on first use (so a
        worker imports CTranslate2 only once it runs a faster-whisper job)."""
        engine = self._engines.get(name)
        if engine is None:
            settings = self._settings
            if name == "faster-whisper":
                from whisperd.engines.faster import FasterWhisper

                engine = FasterWhisper(settings.models_folder, cpu_threads=settings.cpu_threads)
            else:
                engine = self._transcriber.OpenAIWhisper(
                    settings.models_folder, allow_download=settings.allow_download
                )
            self._engines[name] = engine
        return engine

    def _key(self, options: DecodeOptions, name: str) -> ModelKey:
        engine = self.engine(options.engine)
        compute_type = engine.compute_type(options.compute_type, self._settings.device)
        return ModelKey(engine=engine.name, name=name, compute_type=compute_type)

    def get(self, name: str, options: DecodeOptions | None = None) -> LoadedModel:
        key = self._key(options or DecodeOptions(), name)
        loaded = self._models.get(key)
        if loaded is not None:
            self._models.move_to_end(key)
            return loaded
        self._make_room(key.label, self.estimate(key))
        before = self._gpu_bytes_held(key.engine)
        loaded = self._load(key)
        landed = self.engine(key.engine).model_device(loaded)
        if landed.split(":")[0] != self._settings.device.split(":")[0]:
            # A job meant for a GPU never silently runs on the CPU.
            raise RuntimeError(f"model {key.label} landed on {landed}, not on {self._settings.device}")
        self._models[key] = loaded
        measured = loaded.size_bytes
        if self.on_gpu:
            measured = max(measured, self._gpu_bytes_held(key.engine) - before)
            loaded.size_bytes = measured
        self._store.record_model_memory(key.label, self._kind, measured)
        log.info(
            "model.loaded",
            model=key.label,
            engine=key.engine,
            device=self._settings.device,
            seconds=round(loaded.load_seconds, 3),
            bytes=measured,
        )
        put_event(
            self._channel,
            ModelLoaded(model=key.label, device=self._settings.device, seconds=loaded.load_seconds),
        )
        self._report_loaded()
        return loaded

    def _load(self, key: ModelKey) -> LoadedModel:
        return self.engine(key.engine).load(key.name, self._settings.device, compute_type=key.compute_type)

    def load_on_cpu(self, name: str, engine: str) -> LoadedModel:
        """Model `name` of `engine` loaded on the CPU, outside the cache (the
        CPU fallback; a GPU compute type falls back to "auto", int8: the CPU
        cannot run float16). The caller releases it."""
        return self.engine(engine).load(name, "cpu")

    def _gpu_bytes_held(self, engine: str) -> int:
        """GPU memory this worker holds: torch's allocator for openai-whisper;
        NVML's per-process count for CTranslate2, whose memory torch never sees."""
        if not self.on_gpu:
            return 0
        return self.engine(engine).gpu_bytes_held(self._settings.device)

    def estimate(self, key: ModelKey) -> int:
        """Bytes the model will take here: what it took when last measured on
        this kind of device, else the README table (GPU), else twice its
        checkpoint (fp16 weights load as fp32 on the CPU; for CTranslate2,
        its model.bin once)."""
        recorded = self._store.model_memory(key.label, self._kind)
        if recorded:
            return recorded
        table = readme_estimate_bytes(key.name) if self.on_gpu else None
        if table:
            return table
        from whisperd.models import locate as models

        # The file the engine will load (models.model_location: the rule doctor shares).
        try:
            location = models.model_location(self._settings.models_folder, key.name, key.engine)
        except WhisperdError:  # a name no file can have: the load says so, not the estimate
            return 0
        if location is None:
            return 0
        if key.engine == models.FASTER_WHISPER:
            return os.path.getsize(os.path.join(location, "model.bin"))
        return 2 * os.path.getsize(location) if os.path.isfile(location) else 0

    def _make_room(self, incoming: str, estimate: int) -> None:
        if self.on_gpu:
            self._make_room_on_gpu(incoming, estimate)
            return
        budget = self._settings.memory_budget_bytes
        if not budget:
            return
        while self._models and sum(m.size_bytes for m in self._models.values()) + estimate > budget:
            self.unload(next(iter(self._models)), "pressure")
        if estimate > budget:
            log.warning("model.over_budget", model=incoming, estimate_bytes=estimate, budget_bytes=budget)

    def _make_room_on_gpu(self, incoming: str, estimate: int) -> None:
        device = self._settings.device
        reserve = self._settings.memory_reserve_bytes
        while self._transcriber.cuda_free_bytes(device) - reserve < estimate and self._models:
            self.unload(next(iter(self._models)), "pressure")
        free = self._transcriber.cuda_free_bytes(device)
        if free - reserve < estimate:
            raise NoRoomOnDevice(
                f"model {incoming} needs about {estimate / 2**20:.0f} MiB; {device} has "
                f"{free / 2**20:.0f} MiB free with {reserve / 2**20:.0f} MiB kept in reserve"
            )

    def unload(self, key: ModelKey, reason: str) -> None:
        loaded = self._models.pop(key, None)
        if loaded is None:
            return
        self.engine(key.engine).release(loaded)
        del loaded
        if not self.on_gpu:
            # An unloaded model must really leave the worker's RSS (an idle
            # unload comes long after the post-job trim).
            return_freed_memory()
        log.info("model.unloaded", model=key.label, device=self._settings.device, reason=reason)
        put_event(self._channel, ModelUnloaded(model=key.label, device=self._settings.device, reason=reason))
        self._report_loaded()

    def unload_others(self, keep: LoadedModel, reason: str) -> None:
        """Unload every model but `keep` (a loaded model this cache holds)."""
        for key in [k for k, m in self._models.items() if m is not keep]:
            self.unload(key, reason)

    def unload_idle(self, now: float) -> None:
        limit = self._settings.model_idle_unload_seconds
        if not limit:
            return
        for key, loaded in list(self._models.items()):
            if now - loaded.last_used >= limit:
                self.unload(key, "idle")

    def clear(self, reason: str) -> None:
        for key in list(self._models):
            self.unload(key, reason)

    def _report_loaded(self) -> None:
        models = tuple(key.label for key in self._models)
        put_event(self._channel, ModelsLoaded(device=self._settings.device, models=models))
