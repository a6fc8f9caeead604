"""A reload (SIGHUP) that removes an inbox, through the real daemon (issue
11): its running job finishes and its source moves to that inbox's done/;
its queued jobs stay queued in the store but are not claimed (the workers
take younger jobs of the inboxes still configured), `whisperd status` says
their inbox is not configured, and its cancel folder is no longer watched.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

pytestmark = pytest.mark.slow

SpeechFactory = Callable[..., Path]


def _drop(folder: Path, source: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{source.name}.part"
    shutil.copyfile(source, temp)
    return temp.rename(folder / source.name)


def test_a_removed_inboxs_queued_jobs_wait_unclaimed_and_its_running_job_finishes(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    second = DaemonUnderTest.default_inbox(tmp_path, "second")
    daemon = DaemonUnderTest(tmp_path, models_dir, inboxes=[DaemonUnderTest.default_inbox(tmp_path), second])
    try:
        daemon.start()
        _drop(Path(second["path"]), speech(" ".join(SENTENCES), "running"))  # about a minute
        daemon.wait_for_state("running.wav", JobState.RUNNING)
        waiting = _drop(Path(second["path"]), speech(SENTENCES[1], "waiting"))
        queued = daemon.wait_for_state("waiting.wav", JobState.QUEUED)

        daemon.inboxes.remove(second)
        daemon.write_config()
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_for_event("config.reloaded", inboxes=["main"])
        # The premise: the reload came while one job ran and the other waited.
        running = daemon.job_for("running.wav")
        assert running is not None and running.state is JobState.RUNNING
        assert daemon.store.get(queued.id) == queued
        # Its cancel folder is not watched any more: this cancels nothing.
        cancel = Path(second["cancel"])
        cancel.mkdir(parents=True, exist_ok=True)
        waiting.rename(cancel / waiting.name)

        ran = daemon.wait_for_state("running.wav", JobState.DONE, JobState.FAILED, timeout=240)
        assert ran.state is JobState.DONE and ran.attempts == 1
        daemon.wait_for((Path(second["done"]) / "running.wav").is_file, timeout=60, what="moved to done/")
        # The only worker is free: it takes the younger job of `main`, not the waiting one.
        daemon.drop(speech(SENTENCES[2], "kept"))
        assert daemon.wait_for_state("kept.wav", JobState.DONE, timeout=180).attempts == 1
        daemon.wait_for_rescans(2)
        still = daemon.store.get(queued.id)
        assert still is not None and still.state is JobState.QUEUED and still.attempts == 0
        assert not daemon.events("job.cancelled")
        status = daemon.cli("status")
        assert status.returncode == 0, status.stderr
        [line] = [line for line in status.stdout.splitlines() if f"#{queued.id}" in line]
        assert "second/waiting.wav" in line and "inbox second is not configured" in line, line
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.close()
