"""`whisperd status`: what it reads from the store and how it shows it.

One read of the store (`read_status`) gives a `StatusReads`; the CLI prints
either its JSON document (README, Machine-readable output) or its lines.
Each daemon sharing the store is judged live by the lease it registered
with; `stale_after` (the lease of the config `status` runs with) only for a
row an older version wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from whisperd.jobs import Job, JobState
from whisperd.store import report as job_report
from whisperd.watch.rules import REASON_UNSUPPORTED_PREFIX

if TYPE_CHECKING:  # the store's modules load late: CLI start-up stays fast
    from whisperd.store.job_store import JobStore
    from whisperd.store.values import InstanceEntry

# After a queued job whose inbox a reload removed from the config.
_NOT_CONFIGURED = (
    "  (inbox {inbox} is not configured here nor on a live daemon: not claimed until it is added back)"
)


@dataclass(frozen=True, kw_only=True)
class StatusReads:
    """What `status` shows, read from the store at one moment."""

    counts: Mapping[JobState, int]
    paused: Mapping[str, float]
    running: Sequence[Job]
    queued: Sequence[Job]
    ignored: Sequence[Job]
    stuck: Sequence[tuple[Job, str]]
    instances: Sequence[InstanceEntry]
    retrying: Sequence[tuple[Job, int, str]]

    def document(self, stale_after: float) -> dict[str, object]:
        """`status --json`."""
        return {
            "version": job_report.JSON_FORMAT_VERSION,
            "counts": {s.value: self.counts.get(s, 0) for s in JobState},
            "paused_inboxes": sorted(self.paused),
            "running": [job_report.job_document(j) for j in self.running],
            "queued": [job_report.job_document(j) for j in self.queued],
            "ignored": [job_report.job_document(j) for j in self.ignored],
            "stuck": [{**job_report.job_document(j), "stuck_reason": r} for j, r in self.stuck],
            "instances": [instance_document(i, stale_after) for i in self.instances],
            "move_retrying": [
                {**job_report.job_document(j), "failed_moves": n, "move_error": r}
                for j, n, r in self.retrying
            ],
        }

    def lines(self, stale_after: float, *, configured: set[str]) -> list[str]:
        """`status` as text: the instances, the totals, then the jobs."""
        out = list(_instance_lines(self.instances, stale_after))
        out.append("queue: " + ", ".join(f"{s.value} {self.counts.get(s, 0)}" for s in JobState))
        for name in sorted(self.paused):
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.paused[name]))
            out.append(f"  paused  inbox {name} (since {since})")
        # Served: this config's inboxes and those of every live daemon on the store.
        served = configured.union(*(e.inboxes for e in self.instances if e.is_live(stale_after)))
        out.extend(self._job_lines(served))
        for job, attempts, reason in self.retrying:
            out.append(
                f"  #{job.id:<6} {job.state.value}, source waiting in the inbox, move retried "
                f"({attempts} failed): {job.spec.inbox}/{job.spec.rel_path}: {reason}"
            )
        return out

    def _job_lines(self, served: set[str]) -> Iterator[str]:
        """The lines below the totals; a queued job of an inbox no daemon
        serves waits (nobody claims it) until the inbox is back."""
        now = time.time()
        for job in self.running:
            elapsed = now - (job.started_at or now)
            eta = "?" if job.eta_seconds is None else duration(job.eta_seconds)
            cancel = "  (cancelling)" if job.cancel_requested else ""
            yield (
                f"  #{job.id:<6} {_bar(job.progress)} {job.progress * 100:5.1f}%"
                f"  elapsed {duration(elapsed)}"
                f"  eta {eta}  {job.device or '?'}  {job.spec.inbox}/{job.spec.rel_path}{cancel}"
            )
        for job in self.queued:
            yield (
                f"  #{job.id:<6} queued  {job.spec.inbox}/{job.spec.rel_path}"
                f"{'  (retry #' + str(job.attempts + 1) + ')' if job.attempts else ''}"
                f"{'' if job.spec.inbox in served else _NOT_CONFIGURED.format(inbox=job.spec.inbox)}"
            )
        for job in self.ignored:
            yield f"  ignored {job.spec.inbox}/{job.spec.rel_path}: {job.last_error}"
        for job, reason in self.stuck:
            yield (
                f"  #{job.id:<6} {job.state.value}, source stuck in the inbox: "
                f"{job.spec.inbox}/{job.spec.rel_path}: {reason}"
            )


def read_status(store: JobStore) -> StatusReads:
    return StatusReads(
        counts=store.counts(),
        running=store.list_jobs(states=[JobState.RUNNING], limit=1000),
        queued=store.list_jobs(states=[JobState.QUEUED], limit=10),
        paused=store.paused_inboxes(),
        ignored=_ignored_files(store),
        stuck=store.stuck_sources(),
        instances=store.instances(),
        retrying=store.retrying_moves(),
    )


def instance_document(entry: InstanceEntry, stale_after: float) -> dict[str, object]:
    """One daemon sharing the store, for `status --json` (README, Machine-readable output)."""
    return {
        "instance": entry.instance,
        "host": entry.host,
        "pid": entry.pid,
        "version": entry.version,
        "slots": entry.slots,
        "devices": entry.devices.split(",") if entry.devices else [],
        "inboxes": list(entry.inboxes),
        "started_at": entry.started_at,
        "heartbeat_age_seconds": round(entry.age_seconds, 3),
        "lease_seconds": entry.lease_seconds if entry.lease_seconds is not None else stale_after,
        "live": entry.is_live(stale_after),
    }


def _instance_lines(instances: Sequence[InstanceEntry], stale_after: float) -> Iterator[str]:
    """The daemons sharing the store, one line each, above the queue."""
    live = sum(1 for i in instances if i.is_live(stale_after))
    yield f"instances: {len(instances)} ({live} live)"
    for entry in instances:
        state = "live" if entry.is_live(stale_after) else "STALE"
        yield (
            f"  {entry.instance}  host {entry.host}  pid {entry.pid}  "
            f"inboxes {','.join(entry.inboxes) or '-'}  "
            f"heartbeat {entry.age_seconds:.0f} s ago  {state}"
        )


def _ignored_files(store: JobStore) -> list[Job]:
    """Files left in an inbox because whisperd does not take their extension."""
    failed = store.list_jobs(states=[JobState.FAILED], limit=1000)
    return [
        job
        for job in failed
        if (job.last_error or "").startswith(REASON_UNSUPPORTED_PREFIX) and os.path.lexists(job.source)
    ]


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour)."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
