"""What workers and their pool report, as typed events.

A worker puts these frozen dataclasses on its slot's multiprocessing queue
(they pickle); the pool reads them, acts on the two that are its own
(`WorkerStarted`, `WorkerAlive`), adds its own (`DeviceHealth`,
`WorkerRestarted`, `JobCancelSeen`) and hands every one to its owner, which
gives it to the metrics (metrics.registry.MetricsSink) and dispatches on the type
for what it must do itself. Stdlib only.

Each event's `kind` is the name it had when events were string-keyed; it
still names the event in logs (`metrics.event_failed kind=...`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class WorkerStarted:
    """A worker process imported its engine and opened the store."""

    kind: ClassVar[str] = "worker_started"
    # Its worker id in the store ("<instance>/<slot>").
    worker: str
    device: str
    pid: int


@dataclass(frozen=True, kw_only=True)
class WorkerAlive:
    """A worker's proof of life: its canary computed (ok), or failed (error)."""

    kind: ClassVar[str] = "worker_alive"
    worker: str
    ok: bool
    # Why the canary failed ("" when ok).
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class JobStarted:
    """A worker claimed a job and begins its attempt."""

    kind: ClassVar[str] = "job_started"
    inbox: str
    device: str
    # Seconds from queueing to this claim.
    queue_wait_seconds: float


@dataclass(frozen=True, kw_only=True)
class JobFinished:
    """An attempt ended (lifecycle.py), by outcome (metrics.OUTCOMES)."""

    kind: ClassVar[str] = "job_finished"
    job_id: int
    inbox: str
    outcome: str
    # Where the attempt ran ("cpu" after a fallback; "" when unknown).
    device: str
    duration_seconds: float
    audio_seconds: float | None


@dataclass(frozen=True, kw_only=True)
class JobRetried:
    """A failed or released attempt put its job back in the queue."""

    kind: ClassVar[str] = "job_retried"
    inbox: str


@dataclass(frozen=True, kw_only=True)
class JobRejected:
    """A job failed because its file broke an inbox rule (media.reject_kind)."""

    kind: ClassVar[str] = "job_rejected"
    inbox: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class JobCancelSeen:
    """The pool found a cancel another process asked for a job it runs."""

    kind: ClassVar[str] = "job_cancel_seen"
    job_id: int


@dataclass(frozen=True, kw_only=True)
class ModelLoaded:
    kind: ClassVar[str] = "model_loaded"
    # The model's label (worker's ModelKey.label).
    model: str
    device: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ModelUnloaded:
    kind: ClassVar[str] = "model_unloaded"
    model: str
    device: str
    # idle, pressure, oom, shutdown (metrics.UNLOAD_REASONS).
    reason: str


@dataclass(frozen=True, kw_only=True)
class ModelsLoaded:
    """Every model a worker holds now on its device (the others read 0)."""

    kind: ClassVar[str] = "models_loaded"
    device: str
    models: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CpuFallback:
    """A job out of GPU memory is finished on the CPU."""

    kind: ClassVar[str] = "cpu_fallback"
    model: str


@dataclass(frozen=True, kw_only=True)
class WorkerRestarted:
    """The pool replaced a worker process (metrics.RESTART_REASONS)."""

    kind: ClassVar[str] = "worker_restarted"
    slot: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class DeviceHealth:
    """The pool drained a sick GPU (healthy False) or took it back (True)."""

    kind: ClassVar[str] = "device_health"
    device: str
    healthy: bool


WorkerEvent = (
    WorkerStarted
    | WorkerAlive
    | JobStarted
    | JobFinished
    | JobRetried
    | JobRejected
    | JobCancelSeen
    | ModelLoaded
    | ModelUnloaded
    | ModelsLoaded
    | CpuFallback
    | WorkerRestarted
    | DeviceHealth
)

# What the pool hands its owner each event with.
EventHandler = Callable[[WorkerEvent], None]
