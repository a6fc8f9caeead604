"""Writes through linked folders, through the real daemon (issue 11): a
subfolder of output/, failed/ or done/ replaced by a link to a folder
outside, after the job was queued. whisperd writes nothing outside, the job
ends with a reason naming the link (or its source stays in the inbox,
shown by `whisperd status` as stuck), and the daemon stays up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonUnderTest
from whisperd.files.safepath import REASON_LINK
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

SpeechFactory = Callable[..., Path]
TEXT = "Please close the window before you leave the house."


def _link(folder: Path, sub: str, target: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True)
    (folder / sub).symlink_to(target, target_is_directory=True)


def _ended(daemon: DaemonUnderTest, rel_path: str) -> Job:
    return daemon.wait_for_state(rel_path, JobState.DONE, JobState.FAILED, timeout=180)


def _stuck_line(daemon: DaemonUnderTest, job: Job) -> str:
    def shown() -> bool:
        return f"#{job.id}" in daemon.cli("status").stdout

    daemon.wait_for(shown, timeout=60, what=f"job {job.id} listed as stuck")
    [line] = [line for line in daemon.cli("status").stdout.splitlines() if f"#{job.id}" in line]
    return line


def test_linked_subfolders_of_output_failed_and_done_get_nothing_written_outside(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    daemon = DaemonUnderTest(tmp_path / "d", models_dir)
    outside = tmp_path / "outside"
    try:
        daemon.start()
        assert daemon.cli("pause", "main").returncode == 0
        daemon.drop(speech(TEXT, "talk"), sub="o")
        (tmp_path / "bad.mp3").write_text("not audio at all\n", encoding="utf-8")
        daemon.drop(tmp_path / "bad.mp3", sub="f")
        daemon.drop(speech(TEXT, "fine"), sub="d")
        for rel in ("o/talk.wav", "f/bad.mp3", "d/fine.wav"):
            daemon.wait_for_state(rel, JobState.QUEUED)
        # Queued; now each subfolder whisperd will write into is a link outside.
        _link(daemon.output, "o", outside / "o")
        _link(daemon.failed, "f", outside / "f")
        _link(daemon.done, "d", outside / "d")
        assert daemon.cli("resume", "main").returncode == 0

        talk = _ended(daemon, "o/talk.wav")
        assert talk.state is JobState.FAILED
        assert REASON_LINK in (talk.last_error or ""), talk.last_error
        # The store says failed first; the source moves and the note is written after.
        daemon.wait_for(
            lambda: (daemon.store.get(talk.id) or talk).disposed_at is not None,
            timeout=60,
            what="o/talk.wav moved to failed/ with its note",
        )
        # Its source and note went to a real failed/o, inside failed/.
        note = daemon.failed / "o" / "talk.wav.error.txt"
        assert REASON_LINK in note.read_text(encoding="utf-8")
        assert (daemon.failed / "o" / "talk.wav").is_file()

        bad = _ended(daemon, "f/bad.mp3")
        assert bad.state is JobState.FAILED
        assert REASON_LINK in _stuck_line(daemon, bad)
        assert (daemon.inbox / "f" / "bad.mp3").is_file(), "the source stays in the inbox"

        fine = _ended(daemon, "d/fine.wav")
        assert fine.state is JobState.DONE
        line = _stuck_line(daemon, fine)
        assert REASON_LINK in line and "d/fine.wav" in line
        assert (daemon.inbox / "d" / "fine.wav").is_file()
        assert "window" in (daemon.output / "d" / "fine.txt").read_text(encoding="utf-8").lower()

        assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == ["d", "f", "o"]
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.close()


def test_a_linked_subfolder_of_cancel_gets_nothing_when_a_job_is_cancelled_by_id(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    # `whisperd cancel ID` moves the job's source into cancel/ (the user did
    # not put it there): that move, too, must not follow a link.
    daemon = DaemonUnderTest(tmp_path / "d", models_dir)
    outside = tmp_path / "outside"
    try:
        daemon.start()
        assert daemon.cli("pause", "main").returncode == 0
        daemon.drop(speech(TEXT, "talk"), sub="c")
        queued = daemon.wait_for_state("c/talk.wav", JobState.QUEUED)
        _link(daemon.cancel, "c", outside / "c")
        assert daemon.cli("cancel", str(queued.id)).returncode == 0

        cancelled = daemon.wait_for_state("c/talk.wav", JobState.CANCELLED, timeout=60)
        assert REASON_LINK in _stuck_line(daemon, cancelled)
        assert (daemon.inbox / "c" / "talk.wav").is_file(), "the source stays in the inbox"
        assert list((outside / "c").iterdir()) == []
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.close()
