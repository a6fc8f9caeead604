"""A queued file renamed inside its inbox, through the real daemon (issue
11): the new name is transcribed, the old name's job is cancelled saying it
was renamed, and no "vanished" error note is left in failed/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

pytestmark = pytest.mark.slow

SpeechFactory = Callable[..., Path]
TEXT = "Please close the window before you leave the house."


@pytest.mark.parametrize(
    "new_name", ["renamed.wav", "sub/renamed.wav"], ids=["same folder", "into a subfolder"]
)
def test_renaming_a_queued_file_moves_its_job_to_the_new_name_without_an_error_note(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory, new_name: str
) -> None:
    daemon = DaemonUnderTest(tmp_path, models_dir)
    try:
        daemon.start()
        assert daemon.cli("pause", "main").returncode == 0
        source = daemon.drop(speech(TEXT, "first"))
        old = daemon.wait_for_state("first.wav", JobState.QUEUED)
        target = daemon.inbox / new_name
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)

        new = daemon.wait_for_state(new_name, JobState.QUEUED)
        cancelled = daemon.wait_for_state("first.wav", JobState.CANCELLED, timeout=60)
        assert cancelled.id == old.id
        assert "renamed" in (cancelled.last_error or "") and new_name in (cancelled.last_error or "")
        assert daemon.cli("resume", "main").returncode == 0

        done = daemon.wait_for_state(new_name, JobState.DONE, JobState.FAILED, timeout=180)
        assert done.id == new.id and done.state is JobState.DONE, done.last_error
        daemon.wait_for((daemon.done / new_name).is_file, timeout=60, what="source moved to done/")
        stem = Path(new_name).with_suffix("")
        assert "window" in (daemon.output / f"{stem}.txt").read_text(encoding="utf-8").lower()
        daemon.wait_for_rescans(2)
        assert not daemon.failed.exists() or list(daemon.failed.rglob("*")) == [], "no error note"
        assert [j.state for j in daemon.jobs() if j.spec.rel_path == "first.wav"] == [JobState.CANCELLED]
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.close()
