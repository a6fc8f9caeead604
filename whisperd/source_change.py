"""A source that changes under its running job (layer L3, worker side).

A recorder that appends to a file, or a tool that rewrites it in place, keeps
the inode: only size and mtime tell that the content is not what was read.
The worker compares the whole identity (inode, size, mtime_ns) before and
after decoding, before writing outputs and before moving the source; when the
file changed, the transcript is of the old content, so the job runs again on
the final content (or, once it has ended, a new job is made for it).
"""

from __future__ import annotations

from whisperd.jobs import FileIdentity, Job
from whisperd.queue_db import JobStore


class SourceChanged(Exception):
    """The job's file is not the content that was (or is being) transcribed."""

    def __init__(self, path: str, now: FileIdentity) -> None:
        super().__init__(f"{path}: file changed while it was being transcribed; transcribing it again")
        self.now = now


def identity_now(path: str) -> FileIdentity | None:
    try:
        return FileIdentity.of(path)
    except OSError:
        return None


def ensure_unchanged(path: str, read: FileIdentity) -> None:
    """Raise SourceChanged if the file `read` describes (same inode) now has
    other content. A vanished file is left to the checks that say so; a file
    replaced by another (new inode) gets a job of its own once this one ends."""
    now = identity_now(path)
    same_file = now is not None and (now.device, now.inode) == (read.device, read.inode)
    if same_file and now != read:
        assert now is not None
        raise SourceChanged(path, now)


def requeue_changed(store: JobStore, job: Job, token: str, changed: SourceChanged) -> bool:
    """Give the job back (uncounted) with the file's new identity, so the next
    claim transcribes the final content. False if the claim no longer holds."""
    if not store.set_identity(job.id, token, changed.now):
        return False
    return store.release(job.id, token, reason=str(changed))


def changed_since_done(job: Job) -> FileIdentity | None:
    """The new identity of a finished job's source that changed in place after
    its transcript was made (same inode, other size or mtime); else None."""
    now = identity_now(job.source)
    if now is None or (now.device, now.inode) != (job.identity.device, job.identity.inode):
        return None
    return now if now != job.identity else None
