"""A file left in cancel/ must not cancel a later job that merely looks like it.

Recorders write fixed-length chunks: same size, often the same names again.
An old file in cancel/ (there before the job was queued, or there when the
daemon starts) cancels nothing; a file moved there (same inode) while the
daemon was down still cancels its own job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import TERMINAL_STATES, JobState


def _no_active_job_events(daemon: DaemonUnderTest, name: str) -> int:
    return len([e for e in daemon.events("cancel.no_active_job") if e.get("file") == name])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_old_cancel_files_never_cancel_new_identical_size_chunks_across_a_restart(
    daemon_factory: Callable[..., DaemonUnderTest], long_clip: Path, speech: SpeechFactory
) -> None:
    daemon: DaemonUnderTest = daemon_factory("chunks", daemon={"log_level": "info"})
    chunk = speech(SENTENCES[0], "chunk")
    daemon.start()
    daemon.drop(long_clip, "long.wav")  # keeps the one worker busy: the chunks stay queued
    daemon.wait_for_state("long.wav", JobState.RUNNING)

    # An old cancel: a copy left in cancel/ before any chunk_a job existed.
    shutil.copyfile(chunk, daemon.cancel / "chunk_a.wav")
    daemon.wait_for(lambda: _no_active_job_events(daemon, "chunk_a.wav") == 1, what="chunk_a cancel seen")
    for name in ("chunk_a.wav", "chunk_b.wav", "chunk_d.wav"):
        daemon.drop(chunk, name)  # every chunk the same size as the cancel files
    for name in ("chunk_a.wav", "chunk_b.wav", "chunk_d.wav"):
        daemon.wait_for_state(name, JobState.QUEUED)
    assert daemon.stop() == 0

    # While the daemon is down: a plain copy named like a queued chunk, and a
    # real move of another queued chunk.
    shutil.copyfile(chunk, daemon.cancel / "chunk_b.wav")
    os.rename(daemon.inbox / "chunk_d.wav", daemon.cancel / "chunk_d.wav")
    daemon.start()

    moved = daemon.wait_for_state("chunk_d.wav", JobState.CANCELLED, timeout=60)
    assert "cancel folder" in (moved.last_error or "")
    daemon.wait_for(
        lambda: _no_active_job_events(daemon, "chunk_a.wav") == 1, what="chunk_a cancel seen again"
    )
    daemon.wait_for(lambda: _no_active_job_events(daemon, "chunk_b.wav") == 1, what="chunk_b cancel seen")
    for name in ("chunk_a.wav", "chunk_b.wav"):
        # On a fast machine the worker may already have finished long.wav and
        # taken a chunk: any state but cancelled is right here.
        job = daemon.job_for(name)
        assert job is not None and job.state is not JobState.CANCELLED, (name, job)
        assert not job.cancel_requested, (name, job)

    long_job = daemon.job_for("long.wav")
    assert long_job is not None
    if long_job.state not in TERMINAL_STATES:
        daemon.store.request_cancel(long_job.id, reason="test: free the worker")
    for name in ("chunk_a.wav", "chunk_b.wav"):
        done = daemon.wait_for_state(name, JobState.DONE, JobState.FAILED, JobState.CANCELLED, timeout=180)
        assert done.state is JobState.DONE, (name, done.last_error)
        assert (daemon.output / name.replace(".wav", ".txt")).is_file()
