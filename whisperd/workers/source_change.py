"""A source that changes under its running job.

A recorder that appends to a file, or a tool that rewrites it in place, keeps
the inode: only size and mtime tell that the content is not what was read.
The worker compares the whole identity (inode, size, mtime_ns) before and
after decoding, before writing outputs and before moving the source; when the
file changed, the transcript is of the old content, so the job runs again on
the final content (or, once it has ended, a new job is made for it: lifecycle.py).
"""

from __future__ import annotations

from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity


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
    same_file = now is not None and now.same_file(read)
    if same_file and now != read:
        assert now is not None
        raise SourceChanged(path, now)


def changed_source_end(changed: SourceChanged, *, audio_seconds: float | None = None) -> AttemptEnd:
    """The end of an attempt whose source changed under it: handed back
    uncounted with the file's new identity, so the next claim transcribes the
    final content (the lifecycle makes it so)."""
    return AttemptEnd(
        outcome=AttemptOutcome.RELEASED, error=str(changed), identity=changed.now, audio_seconds=audio_seconds
    )
