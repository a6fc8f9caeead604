"""Part of the job store: reading jobs.

Every query that only reads jobs: by id, by file identity or inode, by
source, by state, running ones of a worker or an instance, counts, which
job owns an output name, and a job's attempt history.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from whisperd.jobs import (
    FileIdentity,
    Job,
    JobState,
)
from whisperd.store import counts as store_counts
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.rows import (
    _not_paused,
    _to_int64,
)
from whisperd.store.schema import (
    _ACTIVE_VALUES,
    JOB_ATTEMPTS,
    JOB_OUTPUTS,
    JOBS,
)
from whisperd.store.values import Attempt


class ReadsMixin(StoreBase):
    """Read jobs; nothing here writes."""

    @outage_retried
    def get(self, job_id: int) -> Job | None:
        with self._reading() as conn:
            return self._fetch(conn, job_id)

    @outage_retried
    def find_active_by_identity(self, identity: FileIdentity, *, inbox: str | None = None) -> list[Job]:
        """Queued or running jobs for this file: the same (device, inode), or the
        same (size, mtime_ns) as a copy made with -p keeps. Inode matches first."""
        same_inode = sa.and_(
            JOBS.c.file_device == _to_int64(identity.device),
            JOBS.c.file_inode == _to_int64(identity.inode),
        )
        same_content = sa.and_(JOBS.c.file_size == identity.size, JOBS.c.file_mtime_ns == identity.mtime_ns)
        query = sa.select(JOBS).where(JOBS.c.state.in_(_ACTIVE_VALUES), sa.or_(same_inode, same_content))
        if inbox is not None:
            query = query.where(JOBS.c.inbox == inbox)
        jobs = self._select_jobs(query.order_by(JOBS.c.id))

        def exact_first(job: Job) -> tuple[bool, int]:
            exact = job.identity.same_file(identity)
            return (not exact, job.id)

        return sorted(jobs, key=exact_first)

    @outage_retried
    def queued_with_inodes(self, inbox: str, files: Sequence[tuple[int, int]]) -> list[Job]:
        """Queued jobs of `inbox` whose file is one of these (device, inode):
        one query for a whole batch of new files (intake/renames.py)."""
        by_device: dict[int, list[int]] = {}
        for device, inode in files:
            by_device.setdefault(device, []).append(inode)
        if not by_device:
            return []
        same = sa.or_(
            *(
                sa.and_(
                    JOBS.c.file_device == _to_int64(device),
                    JOBS.c.file_inode.in_([_to_int64(i) for i in inodes]),
                )
                for device, inodes in by_device.items()
            )
        )
        query = sa.select(JOBS).where(JOBS.c.inbox == inbox, JOBS.c.state == JobState.QUEUED.value, same)
        return self._select_jobs(query.order_by(JOBS.c.id))

    @outage_retried
    def find_by_source(self, path: str) -> list[Job]:
        """Jobs whose source is this absolute path, newest first."""
        return self._select_jobs(sa.select(JOBS).where(JOBS.c.source == path).order_by(JOBS.c.id.desc()))

    @outage_retried
    def list_jobs(self, *, states: Sequence[JobState] | None = None, limit: int = 50) -> list[Job]:
        """Jobs newest first, optionally only those in `states`."""
        query = sa.select(JOBS).order_by(JOBS.c.id.desc()).limit(limit)
        if states is not None:
            query = query.where(JOBS.c.state.in_([s.value for s in states]))
        return self._select_jobs(query)

    @outage_retried
    def running_on(self, worker: str) -> list[Job]:
        return self._select_jobs(
            sa.select(JOBS)
            .where(JOBS.c.worker == worker, JOBS.c.state == JobState.RUNNING.value)
            .order_by(JOBS.c.id)
        )

    @outage_retried
    def running_of_instance(self, instance: str) -> list[Job]:
        """Running jobs of `instance`'s workers (worker ids "<instance>/<slot>").
        The state index narrows the look-up to running jobs (a few per slot of
        every host); the prefix is compared exactly, not by a collation's order
        or LIKE's case rules, on both databases."""
        prefix = f"{instance}/"
        return self._select_jobs(
            sa.select(JOBS)
            .where(
                JOBS.c.state == JobState.RUNNING.value,
                sa.func.substr(JOBS.c.worker, 1, len(prefix)) == prefix,
            )
            .order_by(JOBS.c.id)
        )

    @outage_retried
    def counts(self) -> dict[JobState, int]:
        """Number of jobs in every state, zeros included."""
        totals = dict.fromkeys(JobState, 0)
        with self._reading() as conn:
            for state, count in store_counts.read(conn).items():
                totals[JobState(state)] = count
        return totals

    @outage_retried
    def claimable_count(self, inboxes: Sequence[str]) -> int:
        """Queued jobs an instance watching `inboxes` may claim (a paused
        inbox's jobs wait; another host's private inboxes are not its work)."""
        if not inboxes:
            return 0
        query = (
            sa.select(sa.func.count())
            .select_from(JOBS)
            .where(JOBS.c.state == JobState.QUEUED.value, JOBS.c.inbox.in_(list(inboxes)), _not_paused())
        )
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def output_owner(self, path: str) -> str | None:
        """rel_path of the newest done or running job whose outputs include
        `path`, so two sources never write the same output file."""
        owner = self.output_owner_job(path)
        return None if owner is None else owner[1]

    @outage_retried
    def output_owner_job(self, path: str) -> tuple[int, str] | None:
        """(job id, rel_path) of the newest done or running job whose outputs
        include `path`: a name dropped again is another job with the same rel_path."""
        query = (
            sa.select(JOBS.c.id, JOBS.c.rel_path)
            .select_from(JOB_OUTPUTS.join(JOBS, JOBS.c.id == JOB_OUTPUTS.c.job_id))
            .where(
                JOB_OUTPUTS.c.path == path,
                JOBS.c.state.in_([JobState.DONE.value, JobState.RUNNING.value]),
            )
            .order_by(JOBS.c.id.desc())
            .limit(1)
        )
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row[0]), str(row[1]))

    @outage_retried
    def attempts_of(self, job_id: int) -> list[Attempt]:
        """Every recorded attempt at a job, oldest first."""
        query = (
            sa.select(JOB_ATTEMPTS)
            .where(JOB_ATTEMPTS.c.job_id == job_id)
            .order_by(JOB_ATTEMPTS.c.attempt, JOB_ATTEMPTS.c.started_at)
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return [
            Attempt(
                number=int(m["attempt"]),
                worker=str(m["worker"]),
                device=str(m["device"]),
                started_at=float(m["started_at"]),
                ended_at=m["ended_at"],
                outcome=m["outcome"],
                error=m["error"],
            )
            for m in (row._mapping for row in rows)
        ]
