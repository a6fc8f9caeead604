"""Which job a file in a cancel folder cancels.

A move into cancel/ keeps the file's inode; `cp -p` keeps size and mtime; a
plain copy keeps only name and size. Names and sizes repeat (a recorder's
fixed-length chunks `chunk_0001.wav`, a phone's `Recording.m4a`), so a file
left in cancel/ must never cancel a later job that merely looks like it:

- a cancel counts only if it arrived (its ctime: a rename or a copy sets it)
  no earlier than the job was queued;
- a copy (no inode match) counts only if it arrived while this daemon runs:
  files found in cancel/ at start are old, whatever they look like. A file
  moved there while the daemon was down still cancels its own job (inode).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from whisperd.jobs import FileIdentity, Job, JobState

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore

# File-system timestamps come from a coarse kernel clock that may run a tick
# behind time.time(); a cancel made right after the job was queued still counts.
CLOCK_SLACK_SECONDS = 0.1


def _arrived_at(path: str) -> float | None:
    try:
        return os.stat(path, follow_symlinks=False).st_ctime
    except OSError:
        return None


def match_cancelled_file(
    store: JobStore, inbox: str, path: str, identity: FileIdentity, *, running_since: float
) -> list[Job]:
    """The active job (at most one) that the file `path` in `inbox`'s cancel
    folder stands for; `running_since` is when this daemon started (time.time())."""
    arrived = _arrived_at(path)
    if arrived is None:
        return []  # gone again: nothing to cancel

    def after_queued(job: Job) -> bool:
        return arrived + CLOCK_SLACK_SECONDS >= job.created_at

    candidates = store.find_active_by_identity(identity, inbox=inbox)
    moved = [j for j in candidates if j.identity.same_file(identity)]
    for job in moved:
        if after_queued(job):
            return [job]
    if arrived + CLOCK_SLACK_SECONDS < running_since:
        return []  # a copy left in cancel/ before this start: never a new cancel
    copies = [j for j in candidates if j not in moved and after_queued(j)]
    if copies:
        return copies[:1]
    name = os.path.basename(path)
    return [
        job
        for job in store.list_jobs(states=[JobState.QUEUED, JobState.RUNNING], limit=100_000)
        if job.spec.inbox == inbox
        and os.path.basename(job.spec.rel_path) == name
        and job.identity.size == identity.size
        and after_queued(job)
    ][:1]
