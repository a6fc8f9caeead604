"""This daemon as one instance among those sharing a job store: the state
folder's lock and token, the instance's row in the store's registry (taken at
start, beaten from the loop, given back at stop), the inboxes and hooks it
registers, and start-up recovery of the jobs it was running when it stopped.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING

from whisperd import __version__, logs
from whisperd.config import InboxConfig
from whisperd.errors import StoreUnavailable, WhisperdError
from whisperd.files import atomic as atomic_files
from whisperd.files import outputs
from whisperd.jobs import AttemptEnd, AttemptOutcome, Job
from whisperd.store.values import InstanceEntry

if TYPE_CHECKING:
    from whisperd.lifecycle import Lifecycle
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.daemon.root")

# In the state folder: its random id in the instance registry (store/instances.py).
INSTANCE_ID_FILE = "instance.id"

# Runs one job's share of recovery or a sweep, guarded (housekeeping.Tally.per_job).
PerJob = Callable[[str, Job, Callable[[], object]], None]


def lock_state_dir(state_dir: str) -> IO[str]:
    """One daemon per state folder: a second one would run every job twice.
    Returns the lock file, held open (and locked) for the daemon's life."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "whisperd.lock")
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise WhisperdError(f"{path}: another whisperd is running with this state folder") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def state_folder_token(state_dir: str) -> str:
    """The state folder's random id (made at its first use): the same id in
    the registry means the same state folder, whose lock this daemon holds."""
    path = os.path.join(state_dir, INSTANCE_ID_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise WhisperdError(f"{path}: cannot read the instance token: {exc.strerror}") from exc
    if token:
        return token
    token = str(uuid.uuid4())
    atomic_files.write_atomic(path, (token + "\n").encode())  # OutputError names the path and why
    return token


class InstanceRegistry:
    """This instance's rows in the store: its registry entry, its inboxes,
    its hooks. Touched by the daemon's main thread only."""

    def __init__(self, instance: str, *, config_source: str, on_taken_over: Callable[[], None]) -> None:
        self._instance = instance
        # Called once another daemon has taken this name over: this one stops.
        self._on_taken_over = on_taken_over
        # Named in refusals: where to give this daemon another name.
        self._source = config_source
        # This state folder's token while this daemon holds its registry row.
        self._token: str | None = None
        self._next_beat = 0.0

    def register(
        self, store: JobStore, *, state_dir: str, devices: Sequence[str], stale_after: float
    ) -> None:
        """Take this daemon's name in the store's registry, or refuse to start
        while another live daemon holds it (it would re-queue that one's jobs)."""
        token = state_folder_token(state_dir)
        entry = InstanceEntry(
            instance=self._instance,
            token=token,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            slots=len(devices),
            devices=",".join(devices),
            started_at=time.time(),
            lease_seconds=stale_after,
        )
        holder = store.register_instance(entry, stale_after=stale_after)
        if holder is not None:
            raise WhisperdError(
                f"{store.where}: instance {self._instance!r} is already running (host {holder.host}, "
                f"pid {holder.pid}, last heartbeat {holder.age_seconds:.0f} s ago); give this daemon "
                f"another name with [daemon] instance in {self._source}, or stop the other one"
            )
        self._token = token
        log.info("instance.registered", instance=self._instance, slots=entry.slots, devices=entry.devices)

    def register_inboxes(
        self,
        store: JobStore,
        inboxes: Mapping[str, InboxConfig],
        *,
        stale_after: float,
        at_start: bool,
    ) -> None:
        """Tell the store which inboxes this instance watches: its workers
        claim only their jobs. An inbox name another live instance uses for
        another folder is refused (at start: the daemon does not start)."""
        paths = [(i.name, i.path) for i in inboxes.values()]
        conflicts = store.set_instance_inboxes(self._instance, paths, stale_after=stale_after)
        if not conflicts:
            return
        inbox, other, path = conflicts[0]
        message = (
            f"{self._source}: inbox {inbox!r} is {inboxes[inbox].path} here but {path} on "
            f"instance {other!r}; a shared inbox needs the same name and path on every host, a private "
            "one a name of its own"
        )
        if at_start:
            raise WhisperdError(message)
        log.error("config.inbox_conflict", error=message, hint="its jobs are not claimed by this daemon")

    def subscribe_hooks(self, store: JobStore, inboxes: Mapping[str, InboxConfig]) -> None:
        """Tell the store which completion hooks each inbox has: the
        transaction that ends a job (in a worker) records what it owes."""
        store.set_hook_subscriptions(
            self._instance, {name: inbox.hook_kinds() for name, inbox in inboxes.items()}
        )

    def beat(self, store: JobStore, now: float, *, every: float) -> None:
        """Keep this instance's registry row fresh (at most once per `every`
        seconds); if another daemon took the name over (this one was stopped
        past the lease), stop."""
        if self._token is None or now < self._next_beat:
            return
        self._next_beat = now + every
        if store.instance_heartbeat(self._instance, self._token):
            return
        log.error(
            "instance.taken_over",
            instance=self._instance,
            hint="another daemon registered this name while this one was silent; stopping",
        )
        self._token = None
        self._on_taken_over()

    def unregister(self, store: JobStore) -> None:
        if self._token is None:
            return
        try:
            store.unregister_instance(self._instance, self._token)
        except StoreUnavailable as exc:  # the row goes stale and is taken over at the next start
            log.warning("instance.unregister_failed", instance=self._instance, error=str(exc))
        self._token = None


def recover(
    store: JobStore,
    life: Lifecycle,
    *,
    instance: str,
    inboxes: Sequence[InboxConfig],
    per_job: PerJob,
    dispose_owed: Callable[[], None],
) -> None:
    """Start-up reconciliation: jobs this instance was running when it
    stopped go back to the queue (their attempt counts: a file that crashes
    the daemon must not loop), expired leases too (any instance's);
    half-written outputs are removed; finished jobs of this instance's
    inboxes whose source was not yet moved are completed (`dispose_owed`)."""
    for job in store.running_of_instance(instance):
        if job.claim_token:
            per_job("recover", job, functools.partial(_requeue_stopped, life, job))
    store.reclaim_stale()
    for inbox in inboxes:
        try:
            for leftover in outputs.remove_stale_temps(inbox.output):
                log.info("output.temp_removed", path=leftover)
        except Exception as exc:  # noqa: BLE001 - one folder must not keep the daemon from starting
            log.error("output.temp_sweep_failed", inbox=inbox.name, error=str(exc))
    # Sources stuck in their inbox get one more try at each start.
    store.forget_move_failures()
    dispose_owed()


def _requeue_stopped(life: Lifecycle, job: Job) -> None:
    """A job this instance ran when it stopped: a failed attempt, due at once."""
    assert job.claim_token is not None
    end = AttemptEnd(
        outcome=AttemptOutcome.RETRY,
        error="whisperd stopped while the job ran",
        retry_base_seconds=0.0,
        retry_max_seconds=0.0,
    )
    life.end_attempt(job, job.claim_token, end, log_as="job.recovered", log_fields={"attempts": job.attempts})
