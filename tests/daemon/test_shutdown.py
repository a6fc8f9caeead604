"""Stopping the real daemon: SIGTERM/SIGINT with and without time to finish,
a second SIGTERM, and a second daemon on the same state folder."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import WHISPERD, DaemonUnderTest
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

DaemonFactory = Callable[..., DaemonUnderTest]
# About a minute of speech: a job that cannot finish within a short grace.
LONG_TEXT = " ".join(SENTENCES)
FORMATS = ("json", "srt", "tsv", "txt", "vtt")


def wait_for_exit(daemon: DaemonUnderTest, timeout: float = 60.0) -> int:
    assert daemon.process is not None
    code = daemon.process.wait(timeout)
    if daemon._reader is not None:
        daemon._reader.join(10)
    return code


def wait_transcribing(daemon: DaemonUnderTest, rel_path: str) -> Job:
    """The job once its worker has the model loaded and is transcribing it."""
    job = daemon.wait_for_state(rel_path, JobState.RUNNING)
    daemon.wait_for_event("model.loaded")
    return job


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def assert_done_with_outputs(daemon: DaemonUnderTest, rel_path: str, *, attempts: int) -> Job:
    def moved() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and job.state is JobState.DONE and job.disposed_at is not None

    daemon.wait_for(moved, timeout=180.0, what=f"{rel_path} done and moved")
    job = daemon.job_for(rel_path)
    assert job is not None and job.attempts == attempts
    stem = rel_path.rsplit(".", 1)[0]
    assert files_under(daemon.output) == [f"{stem}.{fmt}" for fmt in FORMATS]
    assert (daemon.output / f"{stem}.txt").read_text(encoding="utf-8").strip()
    assert files_under(daemon.done) == [rel_path] and files_under(daemon.inbox) == []
    return job


def assert_requeued_uncounted(daemon: DaemonUnderTest, rel_path: str) -> None:
    """Handed back to the queue, attempt not counted, nothing half-written."""
    job = daemon.job_for(rel_path)
    assert job is not None
    assert job.state is JobState.QUEUED, f"{job.state.value}: {job.last_error}"
    assert job.attempts == 0 and job.claim_token is None
    assert files_under(daemon.output) == []
    assert not list(daemon.root.rglob(f"*{TMP_MARKER}"))
    assert (daemon.inbox / rel_path).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_the_running_job_finish_within_the_grace(
    daemon_factory: DaemonFactory, speech: SpeechFactory, signum: signal.Signals
) -> None:
    daemon = daemon_factory(daemon={"shutdown_grace_seconds": 60.0})
    daemon.start()
    daemon.drop(speech(SENTENCES[0], "talk"))
    daemon.wait_for_state("talk.wav", JobState.RUNNING)

    daemon.send_signal(signum)

    assert wait_for_exit(daemon) == 0, daemon.log_text()
    assert_done_with_outputs(daemon, "talk.wav", attempts=1)
    assert daemon.events("job.released") == []


def test_short_grace_hands_a_long_job_back_uncounted_and_a_restart_finishes_it(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(daemon={"shutdown_grace_seconds": 0.5})
    daemon.start()
    daemon.drop(speech(LONG_TEXT, "lecture"))
    wait_transcribing(daemon, "lecture.wav")

    daemon.send_signal(signal.SIGTERM)

    assert wait_for_exit(daemon) == 0, daemon.log_text()
    assert daemon.wait_for_event("job.released")["file"] == "lecture.wav"
    assert_requeued_uncounted(daemon, "lecture.wav")

    daemon.start()
    assert_done_with_outputs(daemon, "lecture.wav", attempts=1)


def test_second_sigterm_stops_at_once(daemon_factory: DaemonFactory, speech: SpeechFactory) -> None:
    # The grace is far longer than the job: only the second signal can cut it short.
    daemon = daemon_factory(daemon={"shutdown_grace_seconds": 600.0})
    daemon.start()
    daemon.drop(speech(LONG_TEXT, "lecture"))
    wait_transcribing(daemon, "lecture.wav")

    daemon.send_signal(signal.SIGTERM)
    daemon.wait_for_event("daemon.stopping")
    daemon.send_signal(signal.SIGTERM)

    assert wait_for_exit(daemon) == 0, daemon.log_text()
    assert_requeued_uncounted(daemon, "lecture.wav")


def test_second_daemon_on_the_same_state_folder_refuses_to_start(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    daemon.start()
    lock = daemon.state_dir / "whisperd.lock"
    assert daemon.process is not None
    first_pid = daemon.process.pid

    second = subprocess.run(
        [*WHISPERD, "run", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert second.returncode == 1
    output = second.stdout + second.stderr
    assert "another whisperd is running with this state folder" in output
    assert str(lock) in output
    assert "worker.started" not in output
    assert lock.read_text(encoding="utf-8").strip() == str(first_pid)
    assert daemon.process.poll() is None
    assert daemon.stop() == 0
