"""A worker process: claim -> check -> decode -> transcribe -> write -> finish.

One process per device slot, started by gpu_pool with the spawn context
(the daemon hands the pool `worker_main`; the pool never imports this module).
The process talks to the job store directly (every write fenced by its claim
token) and to its pool through a `SlotChannel` of shared primitives, on which
it puts typed events (events.py). Its parts: `ModelCache` (workers/model_cache.py)
keeps its models loaded between jobs; `JobSession` and `Heartbeat`
(workers/job_session.py) carry one running job's progress, cancel and lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import time
from dataclasses import asdict
from typing import Any

from whisperd import crash_points, logs
from whisperd.engines.engine import Audio, LoadedModel
from whisperd.errors import JobCancelled, LeaseLost, MediaError, ModelNotFoundError, NoRoomOnDevice
from whisperd.events import CpuFallback, JobStarted, WorkerAlive, WorkerStarted
from whisperd.files import outputs
from whisperd.files.repeat_names import unrepeated_base
from whisperd.jobs import (
    AttemptEnd,
    AttemptOutcome,
    Claim,
    FileIdentity,
    Job,
    TranscriptResult,
)
from whisperd.lifecycle import Lifecycle
from whisperd.media import decode as media
from whisperd.media.decode import SAMPLE_RATE
from whisperd.store.job_store import JobStore
from whisperd.store.outage import RetryPolicy
from whisperd.workers import liveness
from whisperd.workers.channel import SlotChannel, WorkerSettings, put_event
from whisperd.workers.job_session import Heartbeat, JobSession
from whisperd.workers.model_cache import ModelCache, return_freed_memory
from whisperd.workers.source_change import SourceChanged, changed_source_end, ensure_unchanged

log = logs.get_logger("whisperd.workers.worker")

_PR_SET_PDEATHSIG = 1

# The worker's own points, then the steps of the end (lifecycle.py): "after_transition"
# is just after the job was marked done (or failed...) in the store.


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
    if settings.crash_point:  # the crash-recovery tests only
        crash_points.arm(settings.crash_point, functools.partial(_power_cut, settings.parent_pid))
    # Never wait at exit for queued events to reach a pool that may be gone.
    channel.events.cancel_join_thread()
    from whisperd.engines import openai as transcriber

    transcriber.set_cpu_threads(settings.cpu_threads)

    # A store outage is waited out (claim, finish...) until the daemon says stop;
    # meanwhile the pool is told this worker still answers (no canary runs then).
    def still_alive(_reason: str, _delay: float) -> None:
        put_event(channel, WorkerAlive(worker=settings.worker_id, ok=True))

    retry = RetryPolicy(stop=channel.stop, on_wait=still_alive)
    store = JobStore.open(
        settings.database_url, busy_timeout_seconds=settings.database_busy_timeout_seconds, retry=retry
    )
    cache = ModelCache(settings, channel, store)
    worker = Worker(settings, channel, store, cache)
    put_event(channel, WorkerStarted(worker=settings.worker_id, device=settings.device, pid=os.getpid()))
    try:
        worker.loop()
    finally:
        cache.clear("shutdown")
        store.close()


def _power_cut(daemon_pid: int) -> None:
    """Die like a power cut, daemon first (an armed crash point)."""
    os.kill(daemon_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the daemon dies (kill -9 included),
    so no orphan keeps claiming jobs next to a restarted daemon."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Worker:
    """The claim loop of one worker process."""

    def __init__(
        self,
        settings: WorkerSettings,
        channel: SlotChannel,
        store: JobStore,
        cache: ModelCache,
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
        # Seconds of audio the running attempt decoded (None: not yet).
        self._audio_seconds: float | None = None
        # Every end of an attempt goes through here; its events go to the pool.
        self._lifecycle = Lifecycle(store, functools.partial(put_event, channel))

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
        from whisperd.engines import openai as transcriber

        try:
            transcriber.canary(self._settings.device)
        except Exception as exc:  # noqa: BLE001 - any failure means the device is not usable
            put_event(self._channel, WorkerAlive(worker=self._settings.worker_id, ok=False, error=str(exc)))
            return
        put_event(self._channel, WorkerAlive(worker=self._settings.worker_id, ok=True))

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
            return_freed_memory()

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
        if not current.same_file(job.identity):
            log.info("job.source_replaced", **logs.job_fields(job))
        if current != job.identity:
            self._store.set_identity(job.id, claim.token, current)
        return current

    def _set_current(self, job_id: int) -> None:
        with self._channel.switch_lock:
            self._channel.current_job.value = job_id

    def run(self, claim: Claim) -> None:
        job = claim.job
        bound = log.bind(**logs.job_fields(job), device=self._settings.device)
        bound.info("job.claimed", attempt=job.attempts, max_attempts=job.max_attempts)
        # Where this attempt runs; "cpu" once it falls back (json, metric, log and store agree).
        self._device_used = self._settings.device
        wait = max(0.0, time.time() - job.created_at)
        put_event(
            self._channel,
            JobStarted(inbox=job.spec.inbox, device=self._settings.device, queue_wait_seconds=wait),
        )
        crash_points.reached(crash_points.AFTER_CLAIM)
        session = JobSession(job_id=job.id, channel=self._channel)
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
        self._audio_seconds = None
        try:
            return self._run_attempt(claim, session, heartbeat)
        except JobCancelled:
            return AttemptEnd(
                outcome=AttemptOutcome.CANCELLED, error="cancelled by user", audio_seconds=self._audio_seconds
            )
        except LeaseLost as exc:
            return exc
        except NoRoomOnDevice as exc:
            # Not the file's fault: give it back uncounted, for a device with room.
            self._hold_off_until = time.monotonic() + 5.0
            return AttemptEnd(
                outcome=AttemptOutcome.RELEASED, error=str(exc), audio_seconds=self._audio_seconds
            )
        except SourceChanged as exc:
            bound.info("job.source_changed", error=str(exc))
            return changed_source_end(exc, audio_seconds=self._audio_seconds)
        except (MediaError, ModelNotFoundError) as exc:
            # The same file or model fails the same way every time: no retry.
            return AttemptEnd(
                outcome=AttemptOutcome.FAILED, error=str(exc), audio_seconds=self._audio_seconds
            )
        except Exception as exc:  # noqa: BLE001 - any other failure (disk full, CUDA, a bug) is retried
            if self._cache.engine(job.spec.options.engine).is_out_of_memory(exc):
                self._cache.clear("oom")
            return AttemptEnd(
                outcome=AttemptOutcome.RETRY,
                error=f"{type(exc).__name__}: {exc}",
                audio_seconds=self._audio_seconds,
                retry_base_seconds=self._settings.retry_base_seconds,
                retry_max_seconds=self._settings.retry_max_seconds,
            )

    def _run_attempt(self, claim: Claim, session: JobSession, heartbeat: Heartbeat) -> AttemptEnd:
        """The attempt's way to done; whatever stops it on the way is raised
        (`_attempt` says how that ends it)."""
        job = claim.job
        read = self._check_still_there(claim)
        expected = (read.device, read.inode)
        with media.opened_source(job.spec.inbox_root, job.spec.rel_path, expected) as fd:
            audio = self._read_audio(job, heartbeat, fd)
        ensure_unchanged(job.source, read)  # grown or rewritten while decoding
        # Known from here on, also to an attempt that ends otherwise.
        self._audio_seconds = audio_seconds = len(audio) / SAMPLE_RATE
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
        crash_points.reached(crash_points.AFTER_OUTPUTS)
        return AttemptEnd(
            outcome=AttemptOutcome.DONE,
            outputs=tuple(written),
            decoding_seconds=decoding_seconds,
            decoding_started_at=session.decoding_started_at,
            audio_seconds=audio_seconds,
        )

    def _start_decoding(self, claim: Claim, session: JobSession, audio_seconds: float) -> None:
        """Start the ETA's clock, seeded with the realtime factor of earlier
        jobs of this model on this device (a read: the moment decoding began
        reaches the store with the next heartbeat or the attempt's end). A
        store that cannot answer is not worth failing the job for."""
        job = claim.job
        expected: float | None = None
        try:
            with self._store.failing_fast():
                expected = self._store.realtime_factor(
                    job.spec.model, job.spec.options.engine, job.device or self._settings.device
                )
        except Exception as exc:  # noqa: BLE001 - only the ETA is poorer for it; the next beat renews the lease
            log.warning("job.realtime_factor_unread", **logs.job_fields(job), error=str(exc))
        session.decoding_started(audio_seconds, expected)

    def _transcribe(
        self, loaded: LoadedModel, audio: Audio, claim: Claim, session: JobSession
    ) -> TranscriptResult:
        """Transcribe; on CUDA out-of-memory unload the other models and try
        once more, then (cpu_fallback) finish on the CPU, else fail the
        attempt so another device can take the job."""
        from whisperd.engines import openai as transcriber

        options = claim.job.spec.options
        engine = self._cache.engine(options.engine)
        try:
            return engine.transcribe(loaded, audio, options, session)
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
            return engine.transcribe(loaded, audio, options, session)
        except Exception as exc:
            if not (engine.is_out_of_memory(exc) and self._settings.cpu_fallback):
                raise
        return self._transcribe_on_cpu(audio, claim, session)

    def _transcribe_on_cpu(self, audio: Audio, claim: Claim, session: JobSession) -> TranscriptResult:
        job = claim.job
        log.warning(
            "job.cpu_fallback",
            **logs.job_fields(job),
            device=self._settings.device,
        )
        put_event(self._channel, CpuFallback(model=job.spec.model))
        self._store.set_device(job.id, claim.token, "cpu")
        self._device_used = "cpu"
        options = job.spec.options
        engine = self._cache.engine(options.engine)
        on_cpu = self._cache.load_on_cpu(job.spec.model, options.engine)
        try:
            return engine.transcribe(on_cpu, audio, options, session)
        finally:
            engine.release(on_cpu)

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
