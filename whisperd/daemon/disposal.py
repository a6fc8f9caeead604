"""Bounded retries of an owed source move (through lifecycle.Lifecycle.dispose).

A finished job's source normally leaves the inbox at once (lifecycle.py
Lifecycle.end_attempt). When that move fails, the daemon's sweep tries again here:
a transient error (disk full, I/O error, a busy file) is retried with
backoff; a permanent one (permission, read-only file system, a name that
cannot be formed) or too many failed attempts marks the source "stuck" in
the store, with the reason. Stuck sources are not retried by the sweep, are
logged once, shown by `whisperd status` and counted by a gauge; a restart
tries each once more (the operator may have fixed the folder meanwhile).
"""

from __future__ import annotations

import errno
import random
import time
from typing import TYPE_CHECKING

from whisperd.errors import OutputError
from whisperd.jobs import Job
from whisperd.logs import get_logger

if TYPE_CHECKING:
    from whisperd.lifecycle import Lifecycle
    from whisperd.store.job_store import JobStore

log = get_logger(__name__)

# Errors no retry can fix until someone changes the folders or the name
# (ELOOP: a link where whisperd needs a real folder, see files/safepath.py).
PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EXDEV, errno.ELOOP}
)
# A transient error is retried this many times in all before the source is stuck.
MAX_MOVE_ATTEMPTS = 8
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0


def move_owed_source(lifecycle: Lifecycle, store: JobStore, job: Job, *, now: float | None = None) -> bool:
    """Settle what job still owes once (lifecycle.py); on a failed move record
    it, and mark the source stuck (logged once) when the error is permanent or
    the attempts are used up. Returns True when the source ended up stuck."""
    error = lifecycle.dispose(job)
    if error is None:
        return False
    moment = time.time() if now is None else now
    reason = describe(error)
    attempts = store.move_attempts(job.id) + 1
    stuck = is_permanent(error) or attempts >= MAX_MOVE_ATTEMPTS
    delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** (attempts - 1))
    store.record_move_failure(
        job.id,
        stuck_reason=reason if stuck else None,
        reason=reason,
        next_at=moment + delay * random.uniform(0.8, 1.2),
        now=moment,
    )
    fields = {"job_id": job.id, "inbox": job.spec.inbox, "file": job.spec.rel_path, "reason": reason}
    if stuck:
        hint = "fix the folder, then restart whisperd or run `whisperd retry`"
        log.error("source.stuck", attempts=attempts, hint=hint, **fields)
    else:
        log.warning("source.move_retry", attempts=attempts, retry_in=round(delay, 1), **fields)
    return stuck


def is_permanent(error: Exception) -> bool:
    """A name that cannot be formed, or an errno no retry fixes."""
    if isinstance(error, ValueError):
        return True
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in PERMANENT_ERRNOS


def describe(error: Exception) -> str:
    return error.reason if isinstance(error, OutputError) else str(error)
