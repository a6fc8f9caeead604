"""One running job's progress/cancel seam and its heartbeat thread.

`JobSession` is what the engine reports to (engines.engine.JobControl);
`Heartbeat` renews the job's lease from its own thread, carrying the
session's progress to the store and bringing back a cancel or a lost lease.
Imported only by workers/worker.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from whisperd import crash_points, logs
from whisperd.errors import JobCancelled, LeaseLost
from whisperd.jobs import Claim
from whisperd.workers.channel import SlotChannel, WorkerSettings

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.workers.worker")


@dataclass(kw_only=True)
class JobSession:
    """The progress/cancel seam of one running job (engines.engine.JobControl).

    The engine calls progress() and checkpoint(); the heartbeat thread reads
    the progress and writes it to the store, and learns from the store that
    the job was cancelled or its lease lost."""

    job_id: int
    channel: SlotChannel
    started: float = field(default_factory=time.monotonic)
    fraction: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # time.monotonic() when the engine began (model loaded, audio read): the
    # ETA's clock, so neither counts as decoding time.
    decoding_since: float | None = None
    # time.time() at the same moment: what the store records (heartbeat, end).
    decoding_started_at: float | None = None
    audio_seconds: float = 0.0
    # Seconds of work per second of audio of earlier jobs of this model on
    # this device: the ETA before this job's own progress has moved.
    expected_realtime_factor: float | None = None

    def progress(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        crash_points.reached(crash_points.DURING_TRANSCRIPTION)
        self.checkpoint()

    def checkpoint(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost")
        if self.cancelled.is_set() or self.channel.cancel_job.value == self.job_id:
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def decoding_started(self, audio_seconds: float, expected_realtime_factor: float | None) -> None:
        self.audio_seconds = audio_seconds
        self.expected_realtime_factor = expected_realtime_factor
        self.decoding_since = time.monotonic()
        self.decoding_started_at = time.time()

    def decoding_seconds(self) -> float | None:
        """How long the engine has run so far (None: it has not begun)."""
        return None if self.decoding_since is None else time.monotonic() - self.decoding_since

    def snapshot(self, now: float | None = None) -> tuple[float, float | None]:
        """The fraction done and the ETA in seconds, read together (the engine
        moves the fraction meanwhile). The ETA is the time decoding took so
        far per fraction done, times the fraction left; before the fraction
        moves, the earlier jobs' realtime factor times the audio left."""
        fraction = self.fraction
        if self.decoding_since is None:
            return fraction, None
        elapsed = max(0.0, (time.monotonic() if now is None else now) - self.decoding_since)
        if fraction > 0.0:
            return fraction, elapsed * (1.0 - fraction) / fraction
        if self.expected_realtime_factor is None or self.audio_seconds <= 0.0:
            return fraction, None
        return fraction, max(0.0, self.expected_realtime_factor * self.audio_seconds - elapsed)


class Heartbeat:
    """Renews a running job's lease and writes its progress (owned by Worker,
    one per job)."""

    def __init__(self, store: JobStore, claim: Claim, session: JobSession, settings: WorkerSettings) -> None:
        self._store = store
        self._claim = claim
        self._session = session
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job.id}", daemon=False)
        self.audio_seconds: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def beat(self) -> None:
        # Progress rides on the lease renewal: one store write per
        # heartbeat_seconds, however often the engine reports.
        fraction, eta = self._session.snapshot()
        reply = self._store.heartbeat(
            self._claim.job.id,
            self._claim.token,
            lease_seconds=self._settings.lease_seconds,
            progress=fraction,
            eta_seconds=eta,
            audio_seconds=self.audio_seconds,
            decoding_started_at=self._session.decoding_started_at,
        )
        if not reply.ok:
            self._session.lease_lost.set()
        elif reply.cancel_requested:
            self._session.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.heartbeat_seconds):
            try:
                # The next beat tries again; waiting here would delay the job's end.
                with self._store.failing_fast():
                    self.beat()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the job; the lease covers it
                log.warning("job.heartbeat_failed", **logs.job_fields(self._claim.job), error=str(exc))
