"""A file that grows or is rewritten in place while its job runs.

Same inode, other size and mtime: the transcript of what was read is of the
old content. The job runs again, so the final transcript matches the final
file, and the file that goes to done/ is the one that was transcribed.
"""

from __future__ import annotations

import io
import subprocess
import wave
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SpeechFactory, wer
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

APPENDED = "Please send me the final report before Friday afternoon."
REWRITTEN = "The quick brown fox jumps over the lazy dog."
WER_BOUND = 0.5


def _wait_transcribing(daemon: DaemonUnderTest, rel_path: str) -> int:
    def transcribing() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and job.state is JobState.RUNNING and job.progress > 0

    daemon.wait_for(transcribing, timeout=180, what=f"{rel_path} transcribing")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job.id


def _append_speech_in_place(path: Path, text: str, tmp: Path) -> None:
    """What a recorder does: append PCM at the end, then fix the RIFF header
    (same inode all along). The espeak-ng clips share one format."""
    extra = tmp / "extra.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(extra), text], check=True)
    with wave.open(str(path)) as old, wave.open(str(extra)) as add:
        assert old.getparams()[:3] == add.getparams()[:3]
        frames = old.readframes(old.getnframes()) + add.readframes(add.getnframes())
        params = old.getparams()
    whole = io.BytesIO()
    with wave.open(whole, "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    data = whole.getvalue()
    assert len(data) - len(frames) == 44 == path.stat().st_size - params.nframes * params.sampwidth
    with path.open("r+b") as fh:
        fh.seek(0, io.SEEK_END)
        fh.write(data[path.stat().st_size :])
        fh.seek(0)
        fh.write(data[:44])


def _rewrite_in_place(path: Path, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.write(data)
        fh.truncate()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_file_grown_or_rewritten_in_place_while_running_is_transcribed_as_it_ends(
    daemon_factory: Callable[..., DaemonUnderTest], long_clip: Path, speech: SpeechFactory, tmp_path: Path
) -> None:
    daemon = daemon_factory("change", daemon={"log_level": "info"}, inbox={"formats": ["txt", "json"]})
    daemon.start()
    changes: list[tuple[str, Callable[[Path], None]]] = [
        ("grown.wav", lambda p: _append_speech_in_place(p, APPENDED, tmp_path)),
        ("rewritten.wav", lambda p: _rewrite_in_place(p, speech(REWRITTEN, "rewrite").read_bytes())),
    ]
    for rel_path, change in changes:
        path = daemon.drop(long_clip, rel_path)
        inode = path.stat().st_ino
        job_id = _wait_transcribing(daemon, rel_path)
        change(path)
        assert path.stat().st_ino == inode
        final = path.read_bytes()
        job = daemon.wait_for_state(rel_path, JobState.DONE, JobState.FAILED, timeout=400)
        assert job.state is JobState.DONE and job.id == job_id, job.last_error
        assert job.identity.size == len(final)
        moved = daemon.done / rel_path
        daemon.wait_for(moved.is_file, what=f"{rel_path} in done/")
        assert moved.read_bytes() == final  # the file transcribed is the file kept
        text = (daemon.output / rel_path.replace(".wav", ".txt")).read_text(encoding="utf-8")
        if rel_path == "rewritten.wav":
            assert wer(REWRITTEN, text) < WER_BOUND, text
        else:  # the long speech, then the appended sentence at its end
            tail = " ".join(text.split()[-len(APPENDED.split()) :])
            assert wer(APPENDED, tail) < WER_BOUND, text
        daemon.wait_for_event("job.source_changed", job_id=job_id)
