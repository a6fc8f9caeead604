"""A worker process's proof that it is not frozen.

A worker can be alive yet silent: stopped (SIGSTOP, a cgroup freeze) or
swapped out. Its process still exists, so is_alive() is no help, and a busy
worker is never asked for a canary. So every worker process runs a tiny thread
that writes CLOCK_MONOTONIC (one clock for every process of the host) into a
shared double; the pool calls a worker silent when that value stops moving,
whatever the worker is doing, and replaces it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# How often a worker writes its beat; the pool's bound is many times this.
BEAT_SECONDS = 0.5
# A beat this late means the process is not running at all (stopped, frozen).
FROZEN_AFTER_SECONDS = 10 * BEAT_SECONDS


def start_beating(beat: Any) -> threading.Thread:
    """In the worker: keep `beat` (a shared double) at the monotonic time of now,
    until the process exits (a daemon thread: it never delays an exit)."""

    def run() -> None:
        while True:
            beat.value = time.monotonic()
            time.sleep(BEAT_SECONDS)

    beat.value = time.monotonic()
    thread = threading.Thread(target=run, name="liveness", daemon=True)
    thread.start()
    return thread


def silent_seconds(beat: Any, spawned_at: float, now: float | None = None) -> float:
    """In the pool: how long the worker has given no sign (spawned_at: the
    monotonic time the process was started, counting until its first beat)."""
    now = time.monotonic() if now is None else now
    return now - max(float(beat.value), spawned_at)


def has_beaten(beat: Any) -> bool:
    return float(beat.value) > 0.0
