"""The worker pool: one worker process per device slot (layer L3).

The pool owns the processes: it starts them (spawn context), restarts one
that died, kills one whose cancelled job did not stop within the grace
period, and stops them all on shutdown, handing unfinished jobs back to the
queue. Its owner (the daemon) calls `supervise()` from its loop; the pool
has no thread of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from whisperd import logs
from whisperd.config import WorkersConfig
from whisperd.jobs import Job, JobState
from whisperd.queue_db import JobStore
from whisperd.worker import SlotChannel, WorkerSettings, dispose_source, remove_outputs, worker_main

log = logs.get_logger("whisperd.pool")

_CTX = multiprocessing.get_context("spawn")
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class Slot:
    # Slot name, unique on this host: "cpu-0", "gpu0-0", "gpu1-0"...
    name: str
    # torch device of the slot.
    device: str


def plan_slots(workers: WorkersConfig, gpu_indexes: Sequence[int]) -> list[Slot]:
    """Slots for the configured devices: every GPU ("auto") or the listed
    ones, `jobs_per_device` each; the CPU where there is no GPU."""
    if workers.devices == "cpu" or (workers.devices == "auto" and not gpu_indexes):
        return [Slot(name=f"cpu-{n}", device="cpu") for n in range(workers.cpu_slots)]
    chosen = gpu_indexes if workers.devices == "auto" else list(workers.devices)
    return [
        Slot(name=f"gpu{index}-{n}", device=f"cuda:{index}")
        for index in chosen
        for n in range(workers.jobs_per_device)
    ]


def default_cpu_threads(slots: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, slots))


@dataclass(kw_only=True)
class _SlotState:
    slot: Slot
    settings: WorkerSettings
    channel: SlotChannel
    process: Any = None
    # Cancelled job id -> monotonic deadline after which the worker is killed.
    cancel_deadlines: dict[int, float] = field(default_factory=dict)
    restarts: int = 0


class WorkerPool:
    """Owns one worker process per slot."""

    def __init__(
        self,
        slots: Sequence[Slot],
        settings_for: Callable[[Slot], WorkerSettings],
        store: JobStore,
        *,
        cancel_grace_seconds: float,
        on_event: EventSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cancel_grace = cancel_grace_seconds
        self._on_event = on_event
        self._clock = clock
        self._events = _CTX.Queue()
        self._stopping = False
        self._slots = [
            _SlotState(slot=slot, settings=settings_for(slot), channel=self._new_channel()) for slot in slots
        ]

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for state in self._slots:
            self._spawn(state)

    def stop(self, grace_seconds: float, on_wait: Callable[[float], None] | None = None) -> None:
        """Let running jobs finish within grace_seconds, then kill the workers
        and hand their jobs back to the queue (attempt not counted)."""
        self._stopping = True
        for state in self._slots:
            state.channel.stop.set()
            state.channel.wake.set()
        deadline = self._clock() + grace_seconds
        while any(self._alive(s) for s in self._slots) and self._clock() < deadline:
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
            else:
                self._enforce_cancel(state, now)

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

    def worker_ids(self) -> list[str]:
        return [s.settings.worker_id for s in self._slots]

    def alive_count(self) -> int:
        return sum(1 for s in self._slots if self._alive(s))

    def size(self) -> int:
        return len(self._slots)

    def busy(self) -> dict[str, int]:
        """Slot name -> running job id (0 when idle)."""
        return {s.slot.name: int(s.channel.current_job.value) for s in self._slots}

    # -- internals -------------------------------------------------------------

    def _new_channel(self) -> SlotChannel:
        return SlotChannel(
            stop=_CTX.Event(),
            wake=_CTX.Event(),
            current_job=_CTX.Value("q", 0, lock=False),
            cancel_job=_CTX.Value("q", 0, lock=False),
            switch_lock=_CTX.Lock(),
            events=self._events,
        )

    def _spawn(self, state: _SlotState) -> None:
        process = _CTX.Process(
            target=worker_main,
            args=(state.settings, state.channel),
            name=f"whisperd-worker-{state.slot.name}",
        )
        process.start()
        state.process = process
        log.info("worker.started", slot=state.slot.name, device=state.slot.device, pid=process.pid)

    @staticmethod
    def _alive(state: _SlotState) -> bool:
        return state.process is not None and state.process.is_alive()

    def _replace_dead(self, state: _SlotState) -> None:
        code = state.process.exitcode if state.process is not None else None
        log.error("worker.exited", slot=state.slot.name, exit_code=code)
        self._fail_jobs_of(state, f"worker process died (exit code {code}) while running the job")
        self._restart(state, "crashed")

    def _restart(self, state: _SlotState, reason: str) -> None:
        # A fresh channel: the dead process may have held the switch lock.
        state.channel = self._new_channel()
        state.cancel_deadlines.clear()
        state.restarts += 1
        self._on_event("worker_restarted", {"slot": state.slot.name, "reason": reason})
        self._spawn(state)

    def _kill(self, state: _SlotState) -> None:
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
            new_state = self._store.retry_or_fail(job.id, job.claim_token, error=error)
            log.warning(
                "job.retry" if new_state is JobState.QUEUED else "job.failed",
                job_id=job.id,
                inbox=job.spec.inbox,
                file=job.spec.rel_path,
                error=error,
            )
            if new_state is JobState.FAILED:
                self._dispose(job.id)

    def _release_jobs_of(self, state: _SlotState, reason: str) -> None:
        for job in self._jobs_of(state):
            assert job.claim_token is not None
            remove_outputs(list(job.outputs))
            self._store.release(job.id, job.claim_token, reason=reason)
            log.info(
                "job.released", job_id=job.id, inbox=job.spec.inbox, file=job.spec.rel_path, reason=reason
            )

    def _pick_up_cancels_from_store(self, now: float) -> None:
        """Cancels requested by another process (`whisperd cancel`, another host)."""
        for state in self._slots:
            job_id = int(state.channel.current_job.value)
            if job_id and job_id not in state.cancel_deadlines:
                job = self._store.get(job_id)
                if job is not None and job.cancel_requested and job.state is JobState.RUNNING:
                    self.cancel(job_id, now)

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
        assert job.claim_token is not None
        if self._store.cancel_running(job.id, job.claim_token, reason="cancelled by user"):
            remove_outputs(list(job.outputs))
            self._on_event(
                "job_finished",
                {
                    "inbox": job.spec.inbox,
                    "outcome": "cancelled",
                    "device": job.device or "",
                    "duration_seconds": 0.0,
                    "audio_seconds": None,
                },
            )
            log.info("job.cancelled", job_id=job.id, inbox=job.spec.inbox, file=job.spec.rel_path)
            self._dispose(job.id)

    def _dispose(self, job_id: int) -> None:
        job = self._store.get(job_id)
        if job is not None:
            dispose_source(self._store, job)

    def _drain_events(self) -> None:
        while True:
            try:
                kind, fields = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self._on_event(kind, fields)
