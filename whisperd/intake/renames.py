"""A queued file renamed inside its inbox.

A rename shows up as a new file at the new name, which gets a job of its
own, while the job of the old name would later find its file gone and fail
as "vanished". The old job is the same file under its former name: it is
cancelled (reason: renamed, naming the new job) so no error note is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from whisperd.jobs import FileIdentity, Job

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore


def renamed_away(store: JobStore, jobs: Sequence[Job]) -> list[tuple[Job, Job]]:
    """(old, new) pairs: a queued job of the same inbox for the very same
    file (device and inode) as one of the new `jobs`, under another name that
    no longer holds that file. One store read for the whole batch."""
    if not jobs:
        return []
    new_by_file: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        new_by_file.setdefault((job.identity.device, job.identity.inode), []).append(job)
    found = []
    for other in store.queued_with_inodes(jobs[0].spec.inbox, list(new_by_file)):
        same = (other.identity.device, other.identity.inode)
        for new in new_by_file.get(same, []):
            if other.id == new.id or other.spec.rel_path == new.spec.rel_path:
                continue
            if not _still_holds(other.source, same):
                found.append((other, new))
    return found


def _still_holds(path: str, device_inode: tuple[int, int]) -> bool:
    try:
        now = FileIdentity.of(path)
    except OSError:
        return False
    return (now.device, now.inode) == device_inode


def rename_reason(new_job: Job) -> str:
    return f"renamed in the inbox to {new_job.spec.rel_path} (now job #{new_job.id})"
