"""The job store's contract, by role (layer L0, stdlib and jobs.py only).

What each part of whisperd may ask of the store, one Protocol per role,
each listing exactly the calls that role makes (found by reading its
callers), and the plain values those calls return. `queue_db.JobStore`
implements every one; store/job_store.py checks that with mypy, so a changed
signature breaks the type check rather than a caller.

| protocol | its callers |
| --- | --- |
| IntakeStore | intake/intake.py and its helpers intake/cancel_match.py, intake/renames.py |
| LifecycleStore | lifecycle.py (the one place an attempt ends) |
| WorkerStore | workers/worker.py (a LifecycleStore too: the worker ends its attempts) |
| SupervisorStore | daemon/root.py (recovery, housekeeping, the instance registry), workers/pool.py, daemon/disposal.py |
| HookStore | hooks/runner.py |
| ReaderStore | the reading commands: status, jobs, show |
| OperatorStore | the writing commands: cancel, retry, pause, resume |

The daemon, which builds the store, also uses what only the concrete
store has (`health`, `listener`: L2 objects it owns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from whisperd.jobs import AttemptEnd, Claim, FileIdentity, Job, JobSpec, JobState

# ------------------------------------------------------------------ values ---


@dataclass(frozen=True, kw_only=True)
class HeartbeatReply:
    """What a worker learns from a heartbeat."""

    # False: the lease is lost (reclaimed, handed on); stop and write nothing.
    ok: bool
    # True: someone asked to cancel the job; stop at the next safe point.
    cancel_requested: bool


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One attempt at a job, as `whisperd show` reports it."""

    # 1 for the first claim of the job, counting up (a retried job continues).
    number: int
    # Worker id (host/pid/slot) and device label it ran on.
    worker: str
    device: str
    started_at: float
    # None while the attempt runs.
    ended_at: float | None
    # The job's state right after the attempt: done, failed, cancelled, or
    # queued (retried after an error, handed back at shutdown, lease lost).
    outcome: str | None
    # Why it did not end done (None: it did, or it is still running).
    error: str | None


@dataclass(frozen=True, kw_only=True)
class DeferredFile:
    """A settled file waiting at spec.rel_path for job `waits_for` to end."""

    spec: JobSpec
    # The waiting file as it was when it settled (device and inode name it).
    identity: FileIdentity
    waits_for: int
    recorded_at: float


@dataclass(frozen=True, kw_only=True)
class InstanceEntry:
    """One daemon as the registry knows it."""

    instance: str
    token: str
    host: str
    pid: int
    version: str
    slots: int
    # Comma-separated torch devices of its slots ("cpu", "cuda:0,cuda:1").
    devices: str
    started_at: float
    # Seconds since its last heartbeat, by the database's clock (0 when written).
    age_seconds: float = 0.0
    # Names of the inboxes it watches (filled by list_instances only).
    inboxes: tuple[str, ...] = ()
    # The lease it runs with ([workers] lease_seconds); None for a row an
    # older version wrote.
    lease_seconds: float | None = None

    def is_live(self, default_lease: float) -> bool:
        """Whether its last heartbeat is younger than its own lease (the
        reader's `default_lease` when the row does not say)."""
        lease = self.lease_seconds if self.lease_seconds is not None else default_lease
        return self.age_seconds < lease


@dataclass(frozen=True, kw_only=True)
class HookDelivery:
    """One owed or made delivery of a job's end to one hook."""

    id: int
    job_id: int
    kind: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None


# --------------------------------------------------------------- protocols ---


class IntakeStore(Protocol):
    """Arriving files become jobs; cancel-folder files cancel them."""

    def enqueue(
        self, spec: JobSpec, identity: FileIdentity, *, max_attempts: int, now: float | None = ...
    ) -> tuple[Job, bool]: ...

    def enqueue_many(
        self,
        items: Sequence[tuple[JobSpec, FileIdentity]],
        *,
        max_attempts: int,
        now: float | None = ...,
        skip_moved_twins: bool = ...,
    ) -> list[tuple[Job, bool]]: ...

    def defer_file(
        self, spec: JobSpec, identity: FileIdentity, *, waits_for: int, now: float | None = ...
    ) -> None: ...

    def deferred_files(self, inboxes: Sequence[str], *, ready_only: bool = ...) -> list[DeferredFile]: ...

    def enqueue_deferred(
        self, item: DeferredFile, identity: FileIdentity, *, max_attempts: int, now: float | None = ...
    ) -> tuple[Job, bool]: ...

    def forget_deferred(self, item: DeferredFile) -> bool: ...

    def record_rejected(
        self, spec: JobSpec, identity: FileIdentity, *, reason: str, now: float | None = ...
    ) -> Job: ...

    def mark_disposed(self, job_id: int, moved_to: str, *, now: float | None = ...) -> bool: ...

    def request_cancel(self, job_id: int, *, reason: str, now: float | None = ...) -> Job | None: ...

    def find_by_source(self, path: str) -> list[Job]: ...

    def find_active_by_identity(self, identity: FileIdentity, *, inbox: str | None = ...) -> list[Job]: ...

    def list_jobs(self, *, states: Sequence[JobState] | None = ..., limit: int = ...) -> list[Job]: ...

    def queued_with_inodes(self, inbox: str, files: Sequence[tuple[int, int]]) -> list[Job]: ...


class LifecycleStore(Protocol):
    """An attempt ends (one fenced transition) and its consequences settle."""

    def end_attempt(
        self, job_id: int, token: str, end: AttemptEnd, *, now: float | None = ...
    ) -> JobState | None: ...

    def get(self, job_id: int) -> Job | None: ...

    def mark_disposed(self, job_id: int, moved_to: str, *, now: float | None = ...) -> bool: ...

    def output_owner_job(self, path: str) -> tuple[int, str] | None: ...

    def enqueue(
        self, spec: JobSpec, identity: FileIdentity, *, max_attempts: int, now: float | None = ...
    ) -> tuple[Job, bool]: ...


class WorkerStore(LifecycleStore, Protocol):
    """A worker process: claim, fenced writes while it runs, its model facts."""

    def claim(
        self,
        *,
        worker: str,
        device: str,
        lease_seconds: float,
        inboxes: Sequence[str] | None = ...,
        instance: str | None = ...,
        now: float | None = ...,
    ) -> Claim | None: ...

    def heartbeat(
        self,
        job_id: int,
        token: str,
        *,
        lease_seconds: float,
        progress: float | None = ...,
        eta_seconds: float | None = ...,
        audio_seconds: float | None = ...,
        decoding_started_at: float | None = ...,
        now: float | None = ...,
    ) -> HeartbeatReply: ...

    def set_device(self, job_id: int, token: str, device: str, *, now: float | None = ...) -> bool: ...

    def set_identity(
        self, job_id: int, token: str, identity: FileIdentity, *, now: float | None = ...
    ) -> bool: ...

    def set_outputs(
        self, job_id: int, token: str, outputs: Sequence[str], *, now: float | None = ...
    ) -> bool: ...

    def output_owner(self, path: str) -> str | None: ...

    def realtime_factor(self, model: str, engine: str, device: str, *, sample: int = ...) -> float | None: ...

    def record_model_memory(
        self, model: str, device_kind: str, bytes: int, *, now: float | None = ...
    ) -> None: ...

    def model_memory(self, model: str, device_kind: str) -> int | None: ...

    def failing_fast(self) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...


class SupervisorStore(LifecycleStore, Protocol):
    """The daemon's own calls: registry, recovery, housekeeping, the pool (which ends
    the attempts of the workers it kills through the lifecycle)."""

    @property
    def where(self) -> str: ...

    def failing_fast(self) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...

    def register_instance(self, entry: InstanceEntry, *, stale_after: float) -> InstanceEntry | None: ...

    def instance_heartbeat(self, instance: str, token: str) -> bool: ...

    def set_instance_inboxes(
        self, instance: str, inboxes: Sequence[tuple[str, str]], *, stale_after: float
    ) -> list[tuple[str, str, str]]: ...

    def unregister_instance(self, instance: str, token: str) -> None: ...

    def set_hook_subscriptions(self, instance: str, hooks: Mapping[str, Sequence[str]]) -> None: ...

    def abandon_unsubscribed_hooks(self, *, now: float | None = ...) -> int: ...

    def get(self, job_id: int) -> Job | None: ...

    def list_jobs(self, *, states: Sequence[JobState] | None = ..., limit: int = ...) -> list[Job]: ...

    def counts(self) -> dict[JobState, int]: ...

    def claimable_count(self, inboxes: Sequence[str]) -> int: ...

    def running_on(self, worker: str) -> list[Job]: ...

    def running_of_instance(self, instance: str) -> list[Job]: ...

    def fold_state_counts(self) -> int: ...

    def reclaim_stale(self, *, now: float | None = ...) -> list[Job]: ...

    def paused_inboxes(self) -> dict[str, float]: ...

    def undisposed(
        self,
        *,
        older_than: float = ...,
        inboxes: Sequence[str] | None = ...,
        now: float | None = ...,
        limit: int = ...,
    ) -> list[Job]: ...

    def move_attempts(self, job_id: int) -> int: ...

    def record_move_failure(
        self,
        job_id: int,
        *,
        stuck_reason: str | None,
        next_at: float,
        reason: str = ...,
        now: float | None = ...,
    ) -> int: ...

    def stuck_sources(self, *, limit: int = ...) -> list[tuple[Job, str]]: ...

    def forget_move_failures(self, job_id: int | None = ...) -> int: ...

    def prune_finished(
        self, *, keep_days: float, keep_jobs: int, batch: int = ..., now: float | None = ...
    ) -> int: ...

    def enable_incremental_vacuum(self) -> bool: ...

    def vacuum_free_pages(self, pages: int = ...) -> int: ...


class HookStore(Protocol):
    """The hook runner: owed deliveries, and the job document each one sends."""

    def claim_hook_delivery(
        self,
        hooks: Mapping[str, Sequence[str]],
        *,
        lease: float,
        moved_before: float,
        now: float | None = ...,
    ) -> HookDelivery | None: ...

    def record_hook_outcome(
        self, delivery: HookDelivery, *, error: str | None, retry_at: float | None, now: float | None = ...
    ) -> bool: ...

    def get(self, job_id: int) -> Job | None: ...

    def attempts_of(self, job_id: int) -> list[Attempt]: ...

    def source_stuck_reason(self, job_id: int) -> str | None: ...

    def hook_deliveries_of(self, job_id: int) -> list[HookDelivery]: ...


class ReaderStore(Protocol):
    """The reading commands (status, jobs, show): reads only, nothing written."""

    def close(self) -> None: ...

    def get(self, job_id: int) -> Job | None: ...

    def counts(self) -> dict[JobState, int]: ...

    def list_jobs(self, *, states: Sequence[JobState] | None = ..., limit: int = ...) -> list[Job]: ...

    def paused_inboxes(self) -> dict[str, float]: ...

    def stuck_sources(self, *, limit: int = ...) -> list[tuple[Job, str]]: ...

    def retrying_moves(self, *, limit: int = ...) -> list[tuple[Job, int, str]]: ...

    def instances(self) -> list[InstanceEntry]: ...

    def attempts_of(self, job_id: int) -> list[Attempt]: ...

    def source_stuck_reason(self, job_id: int) -> str | None: ...

    def hook_deliveries_of(self, job_id: int) -> list[HookDelivery]: ...


class OperatorStore(Protocol):
    """The operator's writing commands: cancel, retry, pause, resume."""

    def close(self) -> None: ...

    def get(self, job_id: int) -> Job | None: ...

    def find_by_source(self, path: str) -> list[Job]: ...

    def request_cancel(self, job_id: int, *, reason: str, now: float | None = ...) -> Job | None: ...

    def source_stuck_reason(self, job_id: int) -> str | None: ...

    def forget_move_failures(self, job_id: int | None = ...) -> int: ...

    def requeue_ended(
        self,
        job_id: int,
        *,
        expected: JobState,
        identity: FileIdentity,
        extra_attempts: int,
        now: float | None = ...,
    ) -> Job | None: ...

    def pause_inbox(self, inbox: str, *, now: float | None = ...) -> bool: ...

    def resume_inbox(self, inbox: str) -> bool: ...
