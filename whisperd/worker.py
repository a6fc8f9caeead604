"""A worker process: claim -> check -> decode -> transcribe -> write -> finish
(layer L3).

One process per device slot, started by gpu_pool with the spawn context.
The process talks to the job store directly (every write fenced by its claim
token) and to its pool through a `SlotChannel` of shared primitives. It keeps
its models loaded between jobs (`ModelCache`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from whisperd import lifecycle, liveness, logs, media, outputs, protocols
from whisperd.errors import (
    JobCancelled,
    LeaseLost,
    MediaError,
    ModelNotFoundError,
    NoRoomOnDevice,
)
from whisperd.jobs import (
    AttemptEnd,
    AttemptOutcome,
    Claim,
    DecodeOptions,
    FileIdentity,
    Job,
    TranscriptResult,
)
from whisperd.lifecycle import Lifecycle
from whisperd.queue_db import JobStore
from whisperd.repeat_names import unrepeated_base
from whisperd.source_change import SourceChanged, changed_source_end, ensure_unchanged
from whisperd.store_outage import RetryPolicy

log = logs.get_logger("whisperd.worker")

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a worker process needs; picklable for the spawn context."""

    # Worker id in the job store: "<instance>/<slot>", unique across hosts.
    worker_id: str
    # torch device: "cpu" or "cuda:N".
    device: str
    database_url: str
    # SQLite: how long a write waits for another process's lock (then: backoff and retry).
    database_busy_timeout_seconds: float = 30.0
    models_folder: str
    allow_download: bool
    cpu_threads: int
    lease_seconds: float
    heartbeat_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    model_idle_unload_seconds: float
    # Bytes the models of this worker may hold (0: no limit; CPU slots).
    memory_budget_bytes: int
    # GPU memory left free when deciding whether a model fits.
    memory_reserve_bytes: int = 0
    # After CUDA runs out of memory twice, finish the job on the CPU.
    cpu_fallback: bool = False
    # How often an idle worker proves it is alive with a canary computation.
    health_interval_seconds: float = 15.0
    log_level: str
    log_json: bool | None
    # pid of the daemon; the worker exits when it is gone.
    parent_pid: int
    # Inbox names this worker serves (None: all).
    inboxes: tuple[str, ...] | None = None
    # The daemon instance this worker belongs to: it claims only jobs of the
    # inboxes that instance registered in the store (None: no such filter).
    instance: str | None = None
    # Test hook for crash-recovery tests (env WHISPERD_CRASH_POINT): at this
    # point of a job the worker SIGKILLs the daemon and itself. One of
    # CRASH_POINTS; empty in normal operation.
    crash_point: str = ""
    # Longest a decode may take (workers.decode_timeout_seconds).
    decode_timeout_seconds: float = 900.0


# The worker's own points, then the steps of the end (lifecycle.py): "after_transition"
# is just after the job was marked done (or failed...) in the store.
CRASH_POINTS = ("after_claim", "during_transcription", "after_outputs", *lifecycle.STEPS)


class Flag:
    """A boolean shared with a worker process, in shared memory without a
    lock: setting it never blocks, whatever happened to the other side."""

    def __init__(self, ctx: Any, value: bool = False) -> None:
        self._value = ctx.Value("b", int(value), lock=False)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)


class Doorbell:
    """Wakes an idle worker at once. A pipe whose ringing end never blocks:
    multiprocessing.Event is not usable here, because its set() hangs forever
    once a process that was waiting on it has been killed (cancel kills
    workers)."""

    def __init__(self, ctx: Any) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)
        os.set_blocking(self._writer.fileno(), False)

    def set(self) -> None:
        with contextlib.suppress(OSError):  # full (already rung) or the worker is gone
            self._writer.send_bytes(b"!")

    def wait(self, timeout: float) -> bool:
        rung = bool(self._reader.poll(timeout))
        self.clear()
        return rung

    def clear(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            while self._reader.poll(0):
                self._reader.recv_bytes()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@dataclass(kw_only=True)
class SlotChannel:
    """Shared primitives between the pool and one worker process."""

    # Set by the pool: finish the current job, then exit (a Flag).
    stop: Any
    # Rung by the pool when jobs were queued (a Doorbell).
    wake: Any
    # Id of the job the worker is running (0: idle); written by the worker.
    current_job: Any
    # Id of a job the pool wants cancelled; the worker stops it at its next checkpoint.
    cancel_job: Any
    # Held while current_job changes, so the pool never kills a worker that
    # has moved on to another job.
    switch_lock: Any
    # Set by the pool while the slot's device is drained: claim nothing (a Flag).
    paused: Any
    # Events for the pool (metrics): tuples (kind, fields).
    events: Any
    # Monotonic time of the worker's last liveness beat (a shared double; see liveness.py).
    beat: Any = None


def worker_id_for(instance: str, slot: str) -> str:
    """The worker id of `slot` of daemon `instance`; recovery finds an
    instance's jobs by this prefix."""
    return f"{instance}/{slot}"


def worker_main(settings: WorkerSettings, channel: SlotChannel) -> None:
    """Entry point of a worker process."""
    _die_with_parent()
    # Its own process group, so the pool's kill reaches the ffmpeg it runs too.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if channel.beat is not None:
        liveness.start_beating(channel.beat)  # first: a frozen start-up is caught too
    # The daemon decides when workers stop; a terminal's Ctrl-C reaches the
    # whole process group and must not kill a job mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(settings.log_level, json=settings.log_json)
    # Never wait at exit for queued events to reach a pool that may be gone.
    channel.events.cancel_join_thread()
    from whisperd import transcriber  # heavy import (torch), worker processes only

    transcriber.set_cpu_threads(settings.cpu_threads)

    # A store outage is waited out (claim, finish...) until the daemon says stop;
    # meanwhile the pool is told this worker still answers (no canary runs then).
    def still_alive(_reason: str, _delay: float) -> None:
        _emit(channel, "worker_alive", worker=settings.worker_id, ok=True, error="")

    retry = RetryPolicy(stop=channel.stop, on_wait=still_alive)
    store = JobStore.open(
        settings.database_url, busy_timeout_seconds=settings.database_busy_timeout_seconds, retry=retry
    )
    cache = ModelCache(settings, channel, store)
    worker = Worker(settings, channel, store, cache)
    _emit(channel, "worker_started", worker=settings.worker_id, device=settings.device, pid=os.getpid())
    try:
        worker.loop()
    finally:
        cache.clear("shutdown")
        store.close()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the daemon dies (kill -9 included),
    so no orphan keeps claiming jobs next to a restarted daemon."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _return_freed_memory() -> None:
    """Hand the memory a finished (or cancelled) job freed back to the OS.

    glibc keeps freed heap for reuse, so without this an idle worker holds on
    to its last job's buffers (tens of MB for tiny on a long clip, far more
    with large models) and its RSS wanders from job to job. malloc_trim takes
    milliseconds; where it does not exist (musl) the memory simply stays."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _emit(channel: SlotChannel, kind: str, **fields: Any) -> None:
    with contextlib.suppress(Exception):  # metrics must never break a job
        channel.events.put_nowait((kind, fields))


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


def engine_module(engine: str) -> Any:
    """The engine module a job's `engine` option names (imported on first use:
    faster-whisper's only in workers that run one of its jobs)."""
    if engine == "faster-whisper":
        from whisperd import engine_faster

        return engine_faster
    from whisperd import transcriber

    return transcriber


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


def model_key(options: DecodeOptions, name: str, device: str) -> ModelKey:
    if options.engine != "faster-whisper":
        return ModelKey(engine="openai-whisper", name=name)
    from whisperd.engine_faster import resolve_compute_type

    return ModelKey(
        engine=options.engine, name=name, compute_type=resolve_compute_type(options.compute_type, device)
    )


class ModelCache:
    """The models one worker keeps loaded, least recently used first, within
    the device's free memory (GPU) or the RAM budget (CPU)."""

    def __init__(self, settings: WorkerSettings, channel: SlotChannel, store: JobStore) -> None:
        from whisperd import transcriber

        self._transcriber = transcriber
        self._settings = settings
        self._channel = channel
        self._store = store
        self._models: OrderedDict[ModelKey, Any] = OrderedDict()
        self.on_gpu = settings.device.startswith("cuda")
        self._kind = transcriber.device_kind(settings.device)

    def get(self, name: str, options: DecodeOptions | None = None) -> Any:
        key = model_key(options or DecodeOptions(), name, self._settings.device)
        loaded = self._models.get(key)
        if loaded is not None:
            self._models.move_to_end(key)
            return loaded
        self._make_room(key.label, self.estimate(key))
        before = self._gpu_bytes_held(key.engine)
        loaded = self._load(key)
        landed = engine_module(key.engine).model_device(loaded)
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
        _emit(
            self._channel,
            "model_loaded",
            model=key.label,
            device=self._settings.device,
            seconds=loaded.load_seconds,
        )
        self._report_loaded()
        return loaded

    def _load(self, key: ModelKey) -> Any:
        settings = self._settings
        if key.engine == "openai-whisper":
            return self._transcriber.load_model(
                key.name, settings.models_folder, settings.device, allow_download=settings.allow_download
            )
        from whisperd import engine_faster, models

        source = models.ct2_model_folder(settings.models_folder, key.name)
        if source is None:
            raise ModelNotFoundError(key.name, settings.models_folder, key.engine)
        return engine_faster.load_model(
            key.name,
            source,
            settings.device,
            compute_type=key.compute_type,
            cpu_threads=settings.cpu_threads,
        )

    def _gpu_bytes_held(self, engine: str) -> int:
        """GPU memory this worker holds: torch's allocator for openai-whisper;
        NVML's per-process count for CTranslate2, whose memory torch never sees."""
        if not self.on_gpu:
            return 0
        if engine == "openai-whisper":
            return int(self._transcriber.cuda_allocated_bytes(self._settings.device))
        from whisperd.nvml import NvmlProbe

        probe = NvmlProbe()
        try:
            index = int(self._settings.device.partition(":")[2] or 0)
            return probe.read_process_gpu_memory(index, os.getpid()) or 0
        finally:
            probe.close()

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
        if key.engine == "faster-whisper":
            from whisperd import models

            source = models.ct2_model_folder(self._settings.models_folder, key.name)
            return os.path.getsize(os.path.join(source, "model.bin")) if source else 0
        path = os.path.join(self._settings.models_folder, f"{key.name}.pt")
        return 2 * os.path.getsize(path) if os.path.isfile(path) else 0

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
        engine_module(key.engine).release_model(loaded)
        del loaded
        if not self.on_gpu:
            # An unloaded model must really leave the worker's RSS (an idle
            # unload comes long after the post-job trim).
            _return_freed_memory()
        log.info("model.unloaded", model=key.label, device=self._settings.device, reason=reason)
        _emit(self._channel, "model_unloaded", model=key.label, device=self._settings.device, reason=reason)
        self._report_loaded()

    def unload_others(self, keep: Any, reason: str) -> None:
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
        models = [key.label for key in self._models]
        _emit(self._channel, "models_loaded", device=self._settings.device, models=models)


@dataclass(kw_only=True)
class JobSession:
    """The progress/cancel seam of one running job (transcriber.JobControl).

    The engine calls progress() and checkpoint(); the heartbeat thread reads
    the progress and writes it to the store, and learns from the store that
    the job was cancelled or its lease lost."""

    job_id: int
    channel: SlotChannel
    # Told the name of each progress point (the crash test hook listens).
    on_progress: Callable[[str], None] = lambda _point: None
    started: float = field(default_factory=time.monotonic)
    fraction: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # time.monotonic() when the engine began (model loaded, audio read): the
    # ETA's clock, so neither counts as decoding time.
    decoding_since: float | None = None
    audio_seconds: float = 0.0
    # Seconds of work per second of audio of earlier jobs of this model on
    # this device: the ETA before this job's own progress has moved.
    expected_realtime_factor: float | None = None

    def progress(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        self.on_progress("during_transcription")
        self.checkpoint()

    def checkpoint(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost")
        if self.cancelled.is_set() or self.channel.cancel_job.value == self.job_id:
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def decoding_started(self, audio_seconds: float, expected_realtime_factor: float | None) -> None:
        self.audio_seconds = audio_seconds
        self.expected_realtime_factor = expected_realtime_factor
        self.decoding_since = time.monotonic()

    def decoding_seconds(self) -> float | None:
        """How long the engine has run so far (None: it has not begun)."""
        return None if self.decoding_since is None else time.monotonic() - self.decoding_since

    def snapshot(self, now: float | None = None) -> tuple[float, float | None]:
        """The fraction done and the ETA in seconds, read together (the engine
        moves the fraction meanwhile). The ETA is the time decoding took so
        far per fraction done, times the fraction left; before the fraction
        moves, the earlier jobs' realtime factor times the audio left."""
        fraction = self.fraction
        if self.decoding_since is None:
            return fraction, None
        elapsed = max(0.0, (time.monotonic() if now is None else now) - self.decoding_since)
        if fraction > 0.0:
            return fraction, elapsed * (1.0 - fraction) / fraction
        if self.expected_realtime_factor is None or self.audio_seconds <= 0.0:
            return fraction, None
        return fraction, max(0.0, self.expected_realtime_factor * self.audio_seconds - elapsed)


class Heartbeat:
    """Renews a running job's lease and writes its progress (owned by Worker,
    one per job)."""

    def __init__(self, store: JobStore, claim: Claim, session: JobSession, settings: WorkerSettings) -> None:
        self._store = store
        self._claim = claim
        self._session = session
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job.id}", daemon=False)
        self.audio_seconds: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def beat(self) -> None:
        # Progress rides on the lease renewal: one store write per
        # heartbeat_seconds, however often the engine reports.
        fraction, eta = self._session.snapshot()
        reply = self._store.heartbeat(
            self._claim.job.id,
            self._claim.token,
            lease_seconds=self._settings.lease_seconds,
            progress=fraction,
            eta_seconds=eta,
            audio_seconds=self.audio_seconds,
        )
        if not reply.ok:
            self._session.lease_lost.set()
        elif reply.cancel_requested:
            self._session.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.heartbeat_seconds):
            try:
                # The next beat tries again; waiting here would delay the job's end.
                with self._store.failing_fast():
                    self.beat()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the job; the lease covers it
                log.warning("job.heartbeat_failed", **logs.job_fields(self._claim.job), error=str(exc))


class Worker:
    """The claim loop of one worker process."""

    def __init__(
        self, settings: WorkerSettings, channel: SlotChannel, store: JobStore, cache: ModelCache
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._store = store
        self._cache = cache
        # After a model did not fit, leave the queue to other devices a while.
        self._hold_off_until = 0.0
        # False from the end of a job until the worker finds the queue empty.
        self._memory_returned = True
        self._device_used = settings.device
        # Every end of an attempt goes through here; its events go to the pool.
        self._lifecycle = Lifecycle(
            store, lambda kind, fields: _emit(channel, kind, **fields), crash_at=self._crash_if
        )

    def loop(self) -> None:
        next_canary = 0.0
        while not self._channel.stop.is_set() and os.getppid() == self._settings.parent_pid:
            now = time.monotonic()
            if now >= next_canary:
                next_canary = now + self._settings.health_interval_seconds
                self._canary()
            if self._channel.paused.is_set() or now < self._hold_off_until or not self.step():
                self._channel.wake.wait(min(1.0, self._settings.health_interval_seconds))

    def _canary(self) -> None:
        """Prove to the pool that this worker answers and its device computes."""
        from whisperd import transcriber

        try:
            transcriber.canary(self._settings.device)
        except Exception as exc:  # noqa: BLE001 - any failure means the device is not usable
            _emit(self._channel, "worker_alive", worker=self._settings.worker_id, ok=False, error=str(exc))
            return
        _emit(self._channel, "worker_alive", worker=self._settings.worker_id, ok=True, error="")

    def step(self) -> bool:
        """Claim and run one job; False when there was none."""
        self._channel.wake.clear()
        claim = self._store.claim(
            worker=self._settings.worker_id,
            device=self._settings.device,
            lease_seconds=self._settings.lease_seconds,
            inboxes=self._settings.inboxes,
            instance=self._settings.instance,
        )
        if claim is None:
            self._cache.unload_idle(time.monotonic())
            self._return_memory_once_idle()
            return False
        self._set_current(claim.job.id)
        try:
            self.run(claim)
        finally:
            self._set_current(0)
            self._memory_returned = False
        return True

    def _return_memory_once_idle(self) -> None:
        """Return freed memory when the queue runs dry, not after every job: the
        full gc.collect() in a process holding torch and a model takes ~0.1 s,
        5-10 % of the throughput on back-to-back short jobs. An idle worker
        still hands its last job's memory back at once (one claim later)."""
        if not self._memory_returned:
            self._memory_returned = True
            _return_freed_memory()

    def _read_audio(self, job: Job, heartbeat: Heartbeat, fd: int) -> Any:
        """The source's audio. ffprobe runs first only where the inbox has
        limits to enforce before decoding (a ten-hour file is refused, not
        decoded); otherwise decoding is the check, and only a failure asks
        ffprobe for the reason users know ("no audio stream", "file is
        empty"). The probe is one more process per job: about 5 % of a short
        clip's time on a 2-core machine. Both read `fd`, the file opened once.
        What is decoded is capped at the inbox's max_duration_seconds, or else
        at what the worker's memory allows, whatever the container declares."""
        spec = job.spec
        if spec.max_size_bytes > 0 or spec.max_duration_seconds > 0:
            info = media.check_source(
                job.source,
                max_size_bytes=spec.max_size_bytes,
                max_duration_seconds=spec.max_duration_seconds,
                fd=fd,
            )
            heartbeat.audio_seconds = info.duration_seconds
        try:
            return media.decode_audio(
                job.source,
                fd=fd,
                timeout=self._settings.decode_timeout_seconds,
                max_seconds=self._max_decode_seconds(spec.max_duration_seconds),
            )
        except MediaError:
            media.check_source(job.source, fd=fd)  # raises with the clearer reason, when it finds one
            raise

    def _max_decode_seconds(self, inbox_limit: float) -> float:
        default = media.default_max_decode_seconds(self._settings.memory_budget_bytes)
        return min(inbox_limit, default) if inbox_limit > 0 else default

    def _check_still_there(self, claim: Claim) -> FileIdentity:
        """A file deleted before its job ran fails with that reason; a file
        replaced or changed since (new inode, size or mtime) is transcribed as
        it is now, and the store learns its identity (so the right file moves
        to done/ afterwards). Returns the identity of the content read."""
        job = claim.job
        try:
            current = FileIdentity.of(job.source)
        except FileNotFoundError:
            raise MediaError(job.source, "file vanished before it could be transcribed") from None
        except OSError as exc:
            raise MediaError(job.source, f"cannot read file: {exc.strerror}") from None
        if (current.device, current.inode) != (job.identity.device, job.identity.inode):
            log.info("job.source_replaced", **logs.job_fields(job))
        if current != job.identity:
            self._store.set_identity(job.id, claim.token, current)
        return current

    def _crash_if(self, point: str) -> None:
        """The crash-recovery test hook: die like a power cut, daemon first."""
        if self._settings.crash_point == point:
            os.kill(self._settings.parent_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def _set_current(self, job_id: int) -> None:
        with self._channel.switch_lock:
            self._channel.current_job.value = job_id

    def run(self, claim: Claim) -> None:
        job = claim.job
        bound = log.bind(**logs.job_fields(job), device=self._settings.device)
        bound.info("job.claimed", attempt=job.attempts, max_attempts=job.max_attempts)
        # Where this attempt runs; "cpu" once it falls back (json, metric, log and store agree).
        self._device_used = self._settings.device
        _emit(
            self._channel,
            "job_started",
            inbox=job.spec.inbox,
            device=self._settings.device,
            queue_wait_seconds=max(0.0, time.time() - job.created_at),
        )
        self._crash_if("after_claim")
        session = JobSession(job_id=job.id, channel=self._channel, on_progress=self._crash_if)
        heartbeat = Heartbeat(self._store, claim, session, self._settings)
        heartbeat.start()
        started = time.monotonic()
        try:
            end = self._attempt(claim, session, heartbeat, bound)
        finally:
            heartbeat.stop()
        duration = time.monotonic() - started
        if isinstance(end, LeaseLost):  # the job is someone else's now
            self._lifecycle.lease_lost(
                job,
                str(end),
                device=self._device_used,
                duration_seconds=duration,
                audio_seconds=heartbeat.audio_seconds,
            )
            return
        self._lifecycle.end_attempt(
            job, claim.token, end, device=self._device_used, duration_seconds=duration
        )

    def _attempt(  # noqa: PLR0911 - one return per way an attempt ends
        self, claim: Claim, session: JobSession, heartbeat: Heartbeat, bound: Any
    ) -> AttemptEnd | LeaseLost:
        """Run one attempt; returns how it ended (the lifecycle records it),
        or the LeaseLost that stopped it."""
        job = claim.job
        audio_seconds: float | None = None
        try:
            read = self._check_still_there(claim)
            expected = (read.device, read.inode)
            with media.opened_source(job.spec.inbox_root, job.spec.rel_path, expected) as fd:
                audio = self._read_audio(job, heartbeat, fd)
            ensure_unchanged(job.source, read)  # grown or rewritten while decoding
            audio_seconds = len(audio) / protocols.SAMPLE_RATE
            heartbeat.audio_seconds = audio_seconds
            session.checkpoint()
            loaded = self._cache.get(job.spec.model, job.spec.options)
            session.checkpoint()
            self._start_decoding(claim, session, audio_seconds)
            try:
                result = self._transcribe(loaded, audio, claim, session)
            finally:
                # A cancelled or failed run used the model too: its idle time
                # starts now, not when that run began.
                loaded.last_used = time.monotonic()
            decoding_seconds = session.decoding_seconds()
            ensure_unchanged(job.source, read)  # changed while transcribing
            written = self._write_outputs(claim, result, audio_seconds, session)
            self._crash_if("after_outputs")
            return AttemptEnd(
                outcome=AttemptOutcome.DONE,
                outputs=tuple(written),
                decoding_seconds=decoding_seconds,
                audio_seconds=audio_seconds,
            )
        except JobCancelled:
            return AttemptEnd(
                outcome=AttemptOutcome.CANCELLED, error="cancelled by user", audio_seconds=audio_seconds
            )
        except LeaseLost as exc:
            return exc
        except NoRoomOnDevice as exc:
            # Not the file's fault: give it back uncounted, for a device with room.
            self._hold_off_until = time.monotonic() + 5.0
            return AttemptEnd(outcome=AttemptOutcome.RELEASED, error=str(exc), audio_seconds=audio_seconds)
        except SourceChanged as exc:
            bound.info("job.source_changed", error=str(exc))
            return changed_source_end(exc, audio_seconds=audio_seconds)
        except (MediaError, ModelNotFoundError) as exc:
            # The same file or model fails the same way every time: no retry.
            return AttemptEnd(outcome=AttemptOutcome.FAILED, error=str(exc), audio_seconds=audio_seconds)
        except Exception as exc:  # noqa: BLE001 - any other failure (disk full, CUDA, a bug) is retried
            if engine_module(job.spec.options.engine).is_out_of_memory(exc):
                self._cache.clear("oom")
            return AttemptEnd(
                outcome=AttemptOutcome.RETRY,
                error=f"{type(exc).__name__}: {exc}",
                audio_seconds=audio_seconds,
                retry_base_seconds=self._settings.retry_base_seconds,
                retry_max_seconds=self._settings.retry_max_seconds,
            )

    def _start_decoding(self, claim: Claim, session: JobSession, audio_seconds: float) -> None:
        """Start the ETA's clock, seeded with the realtime factor of earlier
        jobs of this model on this device, and tell the store when decoding
        began (`whisperd show`). Neither is worth failing the job for."""
        job = claim.job
        expected: float | None = None
        try:
            with self._store.failing_fast():
                expected = self._store.realtime_factor(
                    job.spec.model, job.spec.options.engine, job.device or self._settings.device
                )
                # The store's time and the ETA's clock start at the same moment.
                session.decoding_started(audio_seconds, expected)
                self._store.decoding_started(job.id, claim.token, now=time.time())
        except Exception as exc:  # noqa: BLE001 - only the ETA is poorer for it; the next beat renews the lease
            log.warning("job.decoding_start_unrecorded", **logs.job_fields(job), error=str(exc))
        if session.decoding_since is None:
            session.decoding_started(audio_seconds, expected)

    def _transcribe(self, loaded: Any, audio: Any, claim: Claim, session: JobSession) -> TranscriptResult:
        """Transcribe; on CUDA out-of-memory unload the other models and try
        once more, then (cpu_fallback) finish on the CPU, else fail the
        attempt so another device can take the job."""
        from whisperd import transcriber

        options = claim.job.spec.options
        engine = engine_module(options.engine)
        try:
            return engine.transcribe(loaded, audio, options, session)  # type: ignore[no-any-return]
        except Exception as exc:
            if not (self._cache.on_gpu and engine.is_out_of_memory(exc)):
                raise
            log.warning(
                "job.out_of_memory",
                **logs.job_fields(claim.job),
                device=self._settings.device,
                retry="in place",
            )
            self._cache.unload_others(loaded, "oom")
            transcriber.empty_cuda_cache()
        try:
            return engine.transcribe(loaded, audio, options, session)  # type: ignore[no-any-return]
        except Exception as exc:
            if not (engine.is_out_of_memory(exc) and self._settings.cpu_fallback):
                raise
        return self._transcribe_on_cpu(audio, claim, session)

    def _transcribe_on_cpu(self, audio: Any, claim: Claim, session: JobSession) -> TranscriptResult:
        job = claim.job
        log.warning(
            "job.cpu_fallback",
            **logs.job_fields(job),
            device=self._settings.device,
        )
        _emit(self._channel, "cpu_fallback", model=job.spec.model)
        self._store.set_device(job.id, claim.token, "cpu")
        self._device_used = "cpu"
        options = job.spec.options
        engine = engine_module(options.engine)
        on_cpu = self._load_on_cpu(job)
        try:
            return engine.transcribe(on_cpu, audio, options, session)  # type: ignore[no-any-return]
        finally:
            engine.release_model(on_cpu)

    def _load_on_cpu(self, job: Job) -> Any:
        """The job's model loaded on the CPU, outside the cache (a GPU compute
        type falls back to "auto", int8: the CPU cannot run float16)."""
        settings = self._settings
        if job.spec.options.engine != "faster-whisper":
            from whisperd import transcriber

            return transcriber.load_model(
                job.spec.model, settings.models_folder, "cpu", allow_download=settings.allow_download
            )
        from whisperd import engine_faster, models

        source = models.ct2_model_folder(settings.models_folder, job.spec.model)
        if source is None:
            raise ModelNotFoundError(job.spec.model, settings.models_folder, "faster-whisper")
        return engine_faster.load_model(job.spec.model, source, "cpu", cpu_threads=settings.cpu_threads)

    def _write_outputs(
        self, claim: Claim, result: TranscriptResult, audio_seconds: float, session: JobSession
    ) -> list[str]:
        job = claim.job
        spec = job.spec
        convert = outputs.make_converter(spec.chinese)
        result = outputs.convert_result(result, convert)
        metadata = {
            "job_id": job.id,
            "inbox": spec.inbox,
            "source": spec.rel_path,
            "model": spec.model,
            "engine": spec.options.engine,
            "device": self._device_used,
            "worker": self._settings.worker_id,
            "attempt": job.attempts,
            "audio_seconds": audio_seconds,
            "transcribe_seconds": time.monotonic() - session.started,
            "options": spec.options.to_dict(),
            "chinese": spec.chinese,
            "vad": asdict(result.vad) if result.vad is not None else None,
        }
        contents = outputs.render_outputs(result, spec.formats, metadata)

        def is_taken(path: str) -> bool:
            owner = self._store.output_owner(path)
            return owner is not None and owner != spec.rel_path

        def owned_by_other_job(path: str) -> bool:
            owner = self._store.output_owner_job(path)
            return owner is not None and owner[0] != job.id

        base = outputs.choose_output_base(spec.output_dir, spec.rel_path, spec.formats, is_taken)
        base = unrepeated_base(
            base, spec.rel_path, spec.formats, owned_by_other_job=owned_by_other_job, done_dir=spec.done_dir
        )
        planned = [f"{base}.{fmt}" for fmt in contents]
        # Recorded before writing so a cancel that kills this process can
        # find and remove what was written.
        if not self._store.set_outputs(job.id, claim.token, planned):
            raise LeaseLost(f"job {job.id}: lease lost before writing outputs")
        session.checkpoint()
        return outputs.write_outputs(base, contents, root=spec.output_dir)
