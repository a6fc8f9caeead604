"""A worker that is alive but frozen (SIGSTOP here; a cgroup freeze or heavy
swapping look the same from outside) is detected by its missing liveness beat
and replaced, whatever its job's state; the next file is transcribed."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon.test_recovery import DaemonFactory, jobs_for, wait_disposed, worker_pid
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

# Health checks every second: a worker silent for 3 * 1 + 5 = 8 s is replaced.
FAST_HEALTH = {"health_interval_seconds": 1.0}


def process_state(pid: int) -> str | None:
    """The /proc state letter (T: stopped, Z: zombie), None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def silent_restarts(daemon: DaemonUnderTest) -> float:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("whisperd_worker_restarts_total{") and 'reason="silent"' in line
    )


def freeze_and_wait_replaced(daemon: DaemonUnderTest) -> int:
    """SIGSTOP the current worker; wait until the pool logged it silent and a
    new worker started. Returns the frozen pid."""
    frozen = worker_pid(daemon)
    started = len(daemon.events("worker.started"))
    os.kill(frozen, signal.SIGSTOP)
    daemon.wait_for(
        lambda: any(e.get("pid") == frozen for e in daemon.events("worker.silent")), what="silent"
    )
    daemon.wait_for(lambda: len(daemon.events("worker.started")) > started, what="a new worker")
    assert worker_pid(daemon) != frozen
    daemon.wait_for(lambda: process_state(frozen) is None, what="the frozen worker gone (killed and reaped)")
    return frozen


def assert_done(daemon: DaemonUnderTest, name: str, attempts: int) -> None:
    wait_disposed(daemon, name, JobState.DONE, JobState.FAILED)
    jobs = jobs_for(daemon, name)
    assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, attempts)], daemon.log_text()
    assert jobs[0].disposed_to == str(daemon.done / name)


def test_frozen_idle_worker_and_frozen_busy_worker_are_replaced(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    # A lease far longer than the silence bound (8 s): the frozen busy worker
    # is caught by its missing beat, never by its lease, however loaded the machine.
    daemon = daemon_factory(workers={**FAST_HEALTH, "lease_seconds": 60.0})
    daemon.start()
    daemon.drop(speech(SENTENCES[4], "first"))
    assert_done(daemon, "first.wav", attempts=1)  # the worker is up and idle now
    # (b) idle: nothing to run, the worker just stops answering.
    freeze_and_wait_replaced(daemon)
    assert silent_restarts(daemon) == 1
    daemon.drop(speech(SENTENCES[0], "after-idle"))
    assert_done(daemon, "after-idle.wav", attempts=1)

    # (a) while it runs a job (the lease, 60 s, has not run out yet).
    daemon.drop(speech(SENTENCES[1], "busy"))
    daemon.wait_for_state("busy.wav", JobState.RUNNING)
    freeze_and_wait_replaced(daemon)
    retried = daemon.wait_for_event("job.retry", file="busy.wav")
    assert "no sign of life" in retried["error"]
    assert_done(daemon, "busy.wav", attempts=2)
    assert silent_restarts(daemon) == 2
    assert daemon.process is not None and daemon.process.poll() is None
    assert daemon.stop() == 0


def test_frozen_worker_whose_job_was_already_requeued_is_replaced(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    # (c) lease (2 s) far shorter than the silence bound (3 * 3 + 5 = 14 s): the
    # job is re-queued by lease expiry first, and the frozen slot must still go.
    daemon = daemon_factory(workers={"health_interval_seconds": 3.0, "lease_seconds": 2.0})
    daemon.start()
    daemon.drop(speech(SENTENCES[2], "requeued"))
    daemon.wait_for_state("requeued.wav", JobState.RUNNING)
    frozen = worker_pid(daemon)
    os.kill(frozen, signal.SIGSTOP)
    daemon.wait_for_event("job.lease_expired", file="requeued.wav")
    daemon.wait_for(
        lambda: any(e.get("pid") == frozen for e in daemon.events("worker.silent")), what="silent"
    )
    # The lease went first: its expiry is logged before the pool calls the
    # worker silent (both lines come from the daemon, in the order they happened).
    # Read from the log, not from /proc: on a loaded machine the pool may
    # already have killed the frozen worker by the time the test looks.
    events = daemon.events()
    expired = next(
        i
        for i, e in enumerate(events)
        if e.get("event") == "job.lease_expired" and e.get("file") == "requeued.wav"
    )
    silent = next(
        i for i, e in enumerate(events) if e.get("event") == "worker.silent" and e.get("pid") == frozen
    )
    assert expired < silent, daemon.log_text()
    daemon.wait_for(lambda: process_state(frozen) is None, what="the frozen worker gone")
    assert_done(daemon, "requeued.wav", attempts=2)
    daemon.drop(speech(SENTENCES[3], "next"))
    assert_done(daemon, "next.wav", attempts=1)
    assert daemon.stop() == 0
