"""What other threads ask of the worker pool.

The pool is touched by the daemon's loop only. Intake's thread (wake the
workers, stop a running job) and the store listener's thread (PostgreSQL
notices: a job queued in an inbox, a cancel asked for anywhere) put their
requests here and nudge the loop, which hands them to the pool at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection

from whisperd import logs
from whisperd.store import notify as store_notify
from whisperd.store.notify import StoreNotice
from whisperd.workers.pool import WorkerPool

log = logs.get_logger("whisperd.daemon.root")

# What intake asks of the pool (IntakeOwner).
WAKE, STOP_JOB = "wake", "stop_job"


class PoolRequests:
    """Two queues the other threads put on and the loop takes from."""

    def __init__(self, nudge: threading.Event) -> None:
        # Set with each request: the loop runs at once.
        self._nudge = nudge
        # Intake's thread puts (wake the workers, stop a running job), the loop takes.
        self._asked: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        # PostgreSQL's wake-ups (store/notify.py): the listener's thread puts, the loop takes.
        self._notices: queue.SimpleQueue[StoreNotice] = queue.SimpleQueue()

    def on_store_notice(self, notice: StoreNotice) -> None:
        """From the listener's thread: hand the notice to the loop, run it now."""
        self._notices.put(notice)
        self._nudge.set()

    def ask(self, kind: str, job_id: int) -> None:
        """From intake's thread: the pool is the loop's; hand it over, run now."""
        self._asked.put((kind, job_id))
        self._nudge.set()

    def handle(self, pool: WorkerPool, now: float, *, inboxes: Collection[str]) -> None:
        """The loop's share: store notices first, then intake's requests."""
        self._handle_store_notices(pool, now, inboxes)
        self._handle_asked(pool, now)

    def _handle_store_notices(self, pool: WorkerPool, now: float, inboxes: Collection[str]) -> None:
        """Wake idle workers for jobs queued in an inbox of ours (by any host),
        stop a job of ours whose cancel was asked for (anywhere), at once
        instead of at the next poll."""
        woken: set[str] = set()
        while True:
            try:
                notice = self._notices.get_nowait()
            except queue.Empty:
                break
            if notice.kind == store_notify.QUEUED and notice.inbox in inboxes:
                woken.add(notice.inbox)
            elif notice.kind == store_notify.CANCEL and pool.runs(notice.job_id):
                # False when the poll or the job's own heartbeat saw it first.
                stopping = pool.pick_up_cancel(notice.job_id, now)
                log.debug(
                    "pool.woken", reason="notify", kind=notice.kind, job_id=notice.job_id, stopping=stopping
                )
        if woken:
            pool.wake()
            log.debug("pool.woken", reason="notify", kind=store_notify.QUEUED, inboxes=sorted(woken))

    def _handle_asked(self, pool: WorkerPool, now: float) -> None:
        wake = False
        while True:
            try:
                kind, job_id = self._asked.get_nowait()
            except queue.Empty:
                break
            if kind == STOP_JOB:
                pool.cancel(job_id, now)
            else:
                wake = True
        if wake:
            pool.wake()
