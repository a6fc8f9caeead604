"""The plain values the job store's calls return (stdlib and jobs.py only).

They live apart from the store's SQLAlchemy code so that a reader of them
(`whisperd show`'s document, the hook runner) loads no database driver.
Who calls which verb of the store is a table in docs/architecture.md; the
store's contract is its test suite, run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from whisperd.jobs import FileIdentity, JobSpec


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
