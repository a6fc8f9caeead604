"""What the pool and its workers share: the worker's settings,
its id, and the slot channel of shared-memory primitives between the pool
and one worker process, events included.

workers/pool.py builds the channel, workers/worker.py uses it; neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from whisperd.events import WorkerEvent


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
    # Test hook for crash-recovery tests (the hidden `whisperd run
    # --crash-point POINT`): at this point of a job the worker SIGKILLs the
    # daemon and itself. One of crash_points.ALL; empty in normal operation.
    crash_point: str = ""
    # Longest a decode may take (workers.decode_timeout_seconds).
    decode_timeout_seconds: float = 900.0


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
    # Events for the pool (a multiprocessing queue of events.WorkerEvent).
    events: Any
    # Monotonic time of the worker's last liveness beat (a shared double; see workers/liveness.py).
    beat: Any = None


def worker_id_for(instance: str, slot: str) -> str:
    """The worker id of `slot` of daemon `instance`; recovery finds an
    instance's jobs by this prefix."""
    return f"{instance}/{slot}"


def put_event(channel: SlotChannel, event: WorkerEvent) -> None:
    """Send the pool an event (it pickles); never blocks, never raises."""
    with contextlib.suppress(Exception):  # metrics must never break a job
        channel.events.put_nowait(event)
