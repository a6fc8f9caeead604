"""The worker pool: one worker process per device slot.

The pool owns the processes: it starts them (spawn context), restarts one
that died, kills one whose cancelled job did not stop within the grace
period, and stops them all on shutdown, handing unfinished jobs back to the
queue. Its owner (the daemon) calls `supervise()` from its loop; the pool
has no thread of its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from whisperd import events, logs
from whisperd.devices.probe import DeviceProbe
from whisperd.jobs import AttemptEnd, AttemptOutcome, Job, JobState
from whisperd.metrics.state import WorkerView
from whisperd.workers import liveness
from whisperd.workers.channel import Doorbell, Flag, SlotChannel, WorkerSettings
from whisperd.workers.slots import HealthPolicy, Slot

if TYPE_CHECKING:
    from whisperd.lifecycle import Lifecycle
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.pool")

_CTX = multiprocessing.get_context("spawn")
# A worker process's entry point (worker.worker_main, handed in by the daemon).
WorkerMain = Callable[[WorkerSettings, SlotChannel], None]


@dataclass(kw_only=True)
class _SlotState:
    slot: Slot
    settings: WorkerSettings
    channel: SlotChannel
    process: Any = None
    # Cancelled job id -> monotonic deadline after which the worker is killed.
    cancel_deadlines: dict[int, float] = field(default_factory=dict)
    restarts: int = 0
    # Monotonic times: process start, last proof of life (canary).
    started_at: float = 0.0
    alive_at: float = 0.0
    # Whether this process has proved itself alive at least once.
    proven: bool = False
    # time.monotonic() at spawn (the liveness beat's clock, whatever the pool's clock is).
    spawned_mono: float = 0.0
    # A silent worker that SIGKILL did not remove: the slot stays down (and
    # systemd's watchdog unfed) rather than run two workers for one slot.
    stuck: bool = False
    # Claim token of the running attempt -> (progress last seen, monotonic
    # time it last moved). Keyed by attempt, not job: a retried job starts
    # again from zero progress and must not inherit the old attempt's clock.
    progress_seen: dict[str, tuple[float, float]] = field(default_factory=dict)


class WorkerPool:
    """Owns one worker process per slot."""

    def __init__(
        self,
        slots: Sequence[Slot],
        settings_for: Callable[[Slot], WorkerSettings],
        store: JobStore,
        *,
        worker_main: WorkerMain,
        lifecycle: Lifecycle,
        cancel_grace_seconds: float,
        on_event: events.EventHandler,
        probe: DeviceProbe | None = None,
        health: HealthPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._health = health or HealthPolicy()
        self._next_health = 0.0
        # GPU index -> why it is drained.
        self._drained: dict[int, str] = {}
        self._store = store
        self._cancel_grace = cancel_grace_seconds
        self._on_event = on_event
        self._worker_main = worker_main
        # Ends the attempts of workers the pool stops, kills or loses (the daemon's seam).
        self._lifecycle = lifecycle
        # Set by the first worker_started event: a worker imported its engine (torch).
        self._a_worker_started = False
        self._clock = clock
        self._events = _CTX.Queue()
        self._stopping = False
        self._slots = [
            _SlotState(slot=slot, settings=settings_for(slot), channel=self._new_channel()) for slot in slots
        ]
        # The worker processes as last spawned, for the scrape thread: a tuple
        # replaced whole, never changed in place, so reading it needs no lock.
        self._published: tuple[WorkerView, ...] = ()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for state in self._slots:
            self._spawn(state)

    def stop(
        self,
        grace_seconds: float,
        on_wait: Callable[[float], None] | None = None,
        cut_short: Callable[[], bool] | None = None,
    ) -> None:
        """Let running jobs finish within grace_seconds, then kill the workers
        and hand their jobs back to the queue (attempt not counted).
        cut_short() turning true ends the grace at once (a second SIGTERM)."""
        self._stopping = True
        for state in self._slots:
            state.channel.stop.set()
            state.channel.wake.set()
        deadline = self._clock() + grace_seconds

        def waiting() -> bool:
            in_grace = self._clock() < deadline and not (cut_short is not None and cut_short())
            return in_grace and any(self._alive(s) for s in self._slots)

        while waiting():
            if on_wait is not None:
                on_wait(deadline - self._clock())
            self._drain_events()
            for state in self._slots:
                if self._alive(state):
                    state.process.join(0.1)
        for state in self._slots:
            if self._alive(state):
                self._kill(state)
                self._release_jobs_of(state, "daemon stopped before the job finished")
        self._drain_events()
        self._events.close()

    def wake(self) -> None:
        """Tell idle workers that jobs were queued."""
        for state in self._slots:
            state.channel.wake.set()

    # -- supervision ---------------------------------------------------------

    def supervise(self, now: float | None = None) -> None:
        """One supervision pass: events, dead workers, overdue cancels."""
        now = self._clock() if now is None else now
        self._drain_events()
        if self._stopping:
            return
        self._pick_up_cancels_from_store(now)
        for state in self._slots:
            if not self._alive(state):
                self._replace_dead(state)
            elif not self._replace_silent(state):
                self._enforce_cancel(state, now)
        if now >= self._next_health:
            self._next_health = now + self._health.interval_seconds
            self.check_health(now)

    def check_health(self, now: float) -> None:
        """Devices (NVML), silent workers, hung jobs."""
        self._check_devices()
        for state in self._slots:
            if self._alive(state):
                self._check_worker(state, now)

    def drained(self) -> dict[int, str]:
        """GPU index -> why it is out of service."""
        return dict(self._drained)

    def _check_devices(self) -> None:
        if self._probe is None:
            return
        indexes = sorted({s.slot.gpu_index for s in self._slots if s.slot.gpu_index is not None})
        for index in indexes:
            reading = self._probe.read(index)
            device = f"cuda:{index}"
            if not reading.healthy and index not in self._drained:
                reason = (
                    reading.error or ", ".join(reading.bad_throttle_reasons) or "uncorrectable ECC errors"
                )
                self._drain(index, reason)
                self._on_event(events.DeviceHealth(device=device, healthy=False))
            elif reading.healthy and index in self._drained:
                del self._drained[index]
                for state in self._slots_on(index):
                    state.channel.paused.clear()
                    state.channel.wake.set()
                log.info("device.recovered", device=device)
                self._on_event(events.DeviceHealth(device=device, healthy=True))

    def _slots_on(self, index: int) -> list[_SlotState]:
        return [s for s in self._slots if s.slot.gpu_index == index]

    def _drain(self, index: int, reason: str) -> None:
        """Take a sick GPU out of service: its slots claim nothing and their
        running jobs go back to the queue, uncounted, for a healthy device."""
        self._drained[index] = reason
        log.error("device.unhealthy", device=f"cuda:{index}", reason=reason)
        for state in self._slots_on(index):
            state.channel.paused.set()
            if state.channel.current_job.value and self._alive(state):
                self._kill(state)
                self._release_jobs_of(state, f"device cuda:{index} unhealthy: {reason}")
                self._restart(state, "unhealthy")

    def _check_worker(self, state: _SlotState, now: float) -> None:
        job_id = int(state.channel.current_job.value)
        if not job_id:
            state.progress_seen.clear()
            last_sign = max(state.alive_at, state.started_at)
            limit = self._health.silent_worker_seconds
            if not state.proven:
                limit = max(limit, self._health.startup_seconds)
            if now - last_sign > limit:
                pid = state.process.pid if state.process is not None else None
                log.error("worker.silent", slot=state.slot.name, seconds=round(now - last_sign, 1), pid=pid)
                # No canary and no beat: frozen. No canary but beating: its device hangs.
                frozen = (
                    state.channel.beat is not None
                    and liveness.silent_seconds(state.channel.beat, state.spawned_mono)
                    > liveness.FROZEN_AFTER_SECONDS
                )
                self._kill(state)
                self._restart(state, "silent" if frozen else "unhealthy")
            return
        state.alive_at = now  # a busy worker proves itself by its job's progress
        job = self._store.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return
        attempt = job.claim_token or ""
        seen = state.progress_seen.get(attempt)
        if seen is None or job.progress > seen[0]:
            state.progress_seen = {attempt: (job.progress, now)}
            return
        stalled = now - seen[1]
        if stalled > self._health.hung_after(job.audio_seconds):
            log.error(
                "job.hung",
                **logs.job_fields(job),
                seconds=round(stalled, 1),
            )
            self._kill(state)
            self._fail_jobs_of(state, f"hung: no progress for {stalled:.0f} s")
            self._restart(state, "hung")

    def cancel(self, job_id: int, now: float | None = None) -> bool:
        """Stop a running job now: its worker stops at the next checkpoint, or
        is killed after the grace period. False if no slot runs it."""
        now = self._clock() if now is None else now
        for state in self._slots:
            if state.channel.current_job.value == job_id:
                state.channel.cancel_job.value = job_id
                state.cancel_deadlines.setdefault(job_id, now + self._cancel_grace)
                return True
        return False

    def wait_for_a_worker(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until a worker has imported its engine
        and opened the store, handling the events that arrive meanwhile.
        True when one has; the daemon sends READY=1 after it."""
        deadline = time.monotonic() + timeout
        while not self._a_worker_started:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                event = self._events.get(timeout=min(remaining, 0.2))
            except (queue.Empty, OSError, ValueError):
                continue
            self._handle_event(event)
        return True

    def alive_count(self) -> int:
        """Workers alive and answering (a frozen one does not count)."""
        return sum(1 for s in self._slots if self._alive(s) and not self._silent(s))

    def size(self) -> int:
        return len(self._slots)

    def workers(self) -> tuple[WorkerView, ...]:
        """The worker processes (slot, device, pid); safe to call from any thread."""
        return self._published

    def _publish(self) -> None:
        self._published = tuple(
            WorkerView(slot=s.slot.name, device=s.slot.device, gpu_index=s.slot.gpu_index, pid=s.process.pid)
            for s in self._slots
            if s.process is not None and s.process.pid is not None
        )

    def busy(self) -> dict[str, int]:
        """Slot name -> running job id (0 when idle)."""
        return {s.slot.name: int(s.channel.current_job.value) for s in self._slots}

    # -- internals -------------------------------------------------------------

    def _new_channel(self, *, paused: bool = False) -> SlotChannel:
        return SlotChannel(
            paused=Flag(_CTX, paused),
            stop=Flag(_CTX),
            wake=Doorbell(_CTX),
            current_job=_CTX.Value("q", 0, lock=False),
            cancel_job=_CTX.Value("q", 0, lock=False),
            switch_lock=_CTX.Lock(),
            events=self._events,
            beat=_CTX.Value("d", 0.0, lock=False),
        )

    def _spawn(self, state: _SlotState) -> None:
        process = _CTX.Process(
            target=self._worker_main,
            args=(state.settings, state.channel),
            name=f"whisperd-worker-{state.slot.name}",
        )
        process.start()
        state.process = process
        state.started_at = state.alive_at = self._clock()
        state.spawned_mono = time.monotonic()
        state.proven = False
        self._publish()
        log.info("worker.started", slot=state.slot.name, device=state.slot.device, pid=process.pid)

    @staticmethod
    def _alive(state: _SlotState) -> bool:
        return state.process is not None and state.process.is_alive()

    def _silent(self, state: _SlotState) -> bool:
        """No liveness beat for longer than the bound (frozen, stopped, swapped out)."""
        if state.stuck:
            return True
        beat = state.channel.beat
        if beat is None:
            return False
        limit = self._health.silent_worker_seconds
        if not liveness.has_beaten(beat) or not state.proven:
            # Starting: importing torch or initialising CUDA may hold the GIL a long while.
            limit = max(limit, self._health.startup_seconds)
        return liveness.silent_seconds(beat, state.spawned_mono) > limit

    def _replace_silent(self, state: _SlotState) -> bool:
        """SIGKILL and respawn a silent worker, whatever its job's state; its
        job, if still its own, goes through the retry path. True if it was silent."""
        if not self._silent(state):
            return False
        if state.stuck:
            return True
        seconds = liveness.silent_seconds(state.channel.beat, state.spawned_mono)
        log.error("worker.silent", slot=state.slot.name, seconds=round(seconds, 1), pid=state.process.pid)
        self._kill(state)
        if self._alive(state):
            state.stuck = True
            log.error("worker.unkillable", slot=state.slot.name, pid=state.process.pid)
            return True
        self._fail_jobs_of(state, f"worker gave no sign of life for {seconds:.0f} s (frozen or stopped)")
        self._restart(state, "silent")
        return True

    def _replace_dead(self, state: _SlotState) -> None:
        code = state.process.exitcode if state.process is not None else None
        log.error("worker.exited", slot=state.slot.name, exit_code=code)
        self._fail_jobs_of(state, f"worker process died (exit code {code}) while running the job")
        self._restart(state, "crashed")

    def _restart(self, state: _SlotState, reason: str) -> None:
        # A fresh channel: the dead process may have held the switch lock.
        old = state.channel
        state.channel = self._new_channel(paused=old.paused.is_set())
        old.wake.close()
        state.cancel_deadlines.clear()
        state.restarts += 1
        self._on_event(events.WorkerRestarted(slot=state.slot.name, reason=reason))
        self._spawn(state)

    def _kill(self, state: _SlotState) -> None:
        # The worker leads its own process group (worker_main): kill the group,
        # so an ffmpeg it started dies with it. Unreaped, its pid cannot be reused.
        if state.process.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(state.process.pid, signal.SIGKILL)
        state.process.kill()
        state.process.join(10)

    def _jobs_of(self, state: _SlotState) -> list[Job]:
        return [j for j in self._store.running_on(state.settings.worker_id) if j.claim_token]

    def _fail_jobs_of(self, state: _SlotState, error: str) -> None:
        """A worker died under its job: count it as a failed attempt (a file
        that kills its worker every time ends failed after max_attempts)."""
        for job in self._jobs_of(state):
            assert job.claim_token is not None
            if job.cancel_requested:
                self._finish_cancelled(job)
                continue
            end = AttemptEnd(
                outcome=AttemptOutcome.RETRY,
                error=error,
                retry_base_seconds=state.settings.retry_base_seconds,
                retry_max_seconds=state.settings.retry_max_seconds,
            )
            self._lifecycle.end_attempt(job, job.claim_token, end)

    def _release_jobs_of(self, state: _SlotState, reason: str) -> None:
        for job in self._jobs_of(state):
            assert job.claim_token is not None
            end = AttemptEnd(outcome=AttemptOutcome.RELEASED, error=reason)
            self._lifecycle.end_attempt(job, job.claim_token, end, log_fields={"reason": reason})

    def runs(self, job_id: int) -> bool:
        """Whether a slot of this pool runs `job_id` now."""
        return any(int(state.channel.current_job.value) == job_id for state in self._slots)

    def pick_up_cancel(self, job_id: int, now: float | None = None) -> bool:
        """A cancel the store announced (store/notify.py) for `job_id`: True
        if a slot of this pool runs that job and is now told to stop."""
        now = self._clock() if now is None else now
        for state in self._slots:
            if int(state.channel.current_job.value) == job_id and job_id not in state.cancel_deadlines:
                return self._pick_up_cancel(job_id, now)
        return False

    def _pick_up_cancels_from_store(self, now: float) -> None:
        """Cancels requested by another process (`whisperd cancel`, another
        host): the poll, also where a store notice was lost or there is none."""
        for state in self._slots:
            job_id = int(state.channel.current_job.value)
            if job_id and job_id not in state.cancel_deadlines:
                self._pick_up_cancel(job_id, now)

    def _pick_up_cancel(self, job_id: int, now: float) -> bool:
        job = self._store.get(job_id)
        if job is None or not job.cancel_requested or job.state is not JobState.RUNNING:
            return False
        self._on_event(events.JobCancelSeen(job_id=job_id))
        return self.cancel(job_id, now)

    def _enforce_cancel(self, state: _SlotState, now: float) -> None:
        for job_id, deadline in list(state.cancel_deadlines.items()):
            if now < deadline:
                continue
            del state.cancel_deadlines[job_id]
            # Kill only if the worker is still on that job, checked under the
            # lock the worker takes to switch jobs.
            if not state.channel.switch_lock.acquire(timeout=1.0):
                continue
            try:
                if state.channel.current_job.value != job_id:
                    continue
                self._kill(state)
            finally:
                state.channel.switch_lock.release()
            job = self._store.get(job_id)
            if job is not None and job.state is JobState.RUNNING:
                self._finish_cancelled(job)
            log.info("worker.killed", slot=state.slot.name, job_id=job_id, reason="cancel grace expired")
            self._restart(state, "cancel_kill")

    def _finish_cancelled(self, job: Job) -> None:
        """The job of a worker killed for its cancel (or dead while cancelling)."""
        assert job.claim_token is not None
        end = AttemptEnd(outcome=AttemptOutcome.CANCELLED, error="cancelled by user")
        self._lifecycle.end_attempt(job, job.claim_token, end)

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self._handle_event(event)

    def _handle_event(self, event: events.WorkerEvent) -> None:
        if isinstance(event, events.WorkerAlive):
            self._note_alive(event)
        elif isinstance(event, events.WorkerStarted):
            self._a_worker_started = True
            log.info("worker.ready", worker=event.worker, device=event.device, pid=event.pid)
        self._on_event(event)

    def _note_alive(self, event: events.WorkerAlive) -> None:
        for state in self._slots:
            if state.settings.worker_id != event.worker:
                continue
            if event.ok:
                state.alive_at = self._clock()
                state.proven = True
            else:
                log.error("worker.canary_failed", slot=state.slot.name, error=event.error)
                # The next health check restarts it.
                state.alive_at = state.started_at = float("-inf")
