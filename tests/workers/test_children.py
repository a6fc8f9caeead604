"""Through the real daemon: a worker's ffmpeg dies with the worker, and a
folder above a queued file swapped for a link is never followed."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SENTENCES
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

pytestmark = pytest.mark.slow


def sparse_wav(path: Path, data_bytes: int, rate: int = 48_000) -> Path:
    """A mono 16-bit WAV whose header declares data_bytes of samples, all a
    hole in the file: hours of (silent) audio that take no disk."""
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    with path.open("wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + data_bytes)
    return path


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ffmpeg_for(name: str, *, within: Path | None = None) -> list[int]:
    """ffmpeg/ffprobe processes anywhere on the machine reading a file called
    name (whose command line also names `within`: a test's own folder, so a
    test running beside it with a file of the same name does not count)."""
    found = []
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        args = _cmdline(pid)
        if not args or Path(args[0]).name not in ("ffmpeg", "ffprobe"):
            continue
        if any(name in arg for arg in args) and (within is None or any(str(within) in arg for arg in args)):
            found.append(pid)
    return found


@pytest.fixture
def stopped_ffmpeg() -> Iterator[list[int]]:
    """ffmpeg pids a test stopped; killed afterwards whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _decoding(daemon: DaemonUnderTest, stopped: list[int]) -> tuple[int, int]:
    """(worker pid, ffmpeg pid) once the only worker decodes; ffmpeg is then
    stopped (SIGSTOP), standing for one busy in a read that does not return."""
    assert daemon.process is not None
    found: list[tuple[int, int]] = []

    def decoding() -> bool:
        for worker in _children(daemon.process.pid):  # type: ignore[union-attr]
            for child in _children(worker):
                if Path(_cmdline(child)[0]).name == "ffmpeg":
                    found.append((worker, child))
                    return True
        return False

    daemon.wait_for(decoding, timeout=120, what="the worker's ffmpeg")
    worker, ffmpeg = found[0]
    os.kill(ffmpeg, signal.SIGSTOP)
    stopped.append(ffmpeg)
    return worker, ffmpeg


@pytest.mark.parametrize("how", ["cancel", "sigkill"])
def test_ffmpeg_dies_with_its_worker(
    daemon_factory: Callable[..., DaemonUnderTest], stopped_ffmpeg: list[int], how: str
) -> None:
    """The pool kills a worker whose cancelled job does not stop (its process
    group: ffmpeg too), or the worker is killed from outside (ffmpeg gets the
    parent-death signal): either way no ffmpeg is left behind."""
    daemon = daemon_factory()
    daemon.start()
    name = f"hours-{how}.wav"
    sparse_wav(daemon.root / "hours.wav", 1_900_000_000)
    os.rename(daemon.root / "hours.wav", daemon.inbox / name)
    worker, ffmpeg = _decoding(daemon, stopped_ffmpeg)
    job = daemon.wait_for_state(name, JobState.RUNNING)
    if how == "cancel":
        assert daemon.cli("cancel", str(job.id)).returncode == 0
        daemon.wait_for_event("worker.killed", job_id=job.id)
        daemon.wait_for_state(name, JobState.CANCELLED)
    else:
        os.kill(worker, signal.SIGKILL)
    daemon.wait_for(
        lambda: not _alive(ffmpeg), timeout=30, what=f"ffmpeg {ffmpeg} to die with worker {worker}"
    )
    assert ffmpeg_for(name) == []
    # The pool replaced the worker and the daemon goes on transcribing.
    daemon.wait_for(lambda: not _alive(worker), timeout=30, what="the old worker to be gone")
    assert daemon.process is not None and daemon.process.poll() is None


@pytest.mark.parametrize("target", ["its-own-folder", "another-folder"])
def test_a_folder_swapped_for_a_link_before_the_job_runs_is_not_followed(
    daemon_factory: Callable[..., DaemonUnderTest],
    speech: Callable[..., Path],
    long_clip: Path,
    target: str,
) -> None:
    """inbox/sub/talk.wav is queued, then `sub` becomes a link: to the folder
    itself moved out of the inbox (the same file, outside now) or to another
    folder. The job fails saying why; nothing outside is read, moved or written."""
    daemon = daemon_factory()
    daemon.start()
    daemon.drop(long_clip, "busy.wav")
    busy = daemon.wait_for_state("busy.wav", JobState.RUNNING)
    daemon.drop(speech(SENTENCES[2], "talk"), "talk.wav", sub="sub")
    daemon.wait_for_state("sub/talk.wav", JobState.QUEUED)
    outside = daemon.root / "outside"
    if target == "its-own-folder":
        os.rename(daemon.inbox / "sub", outside)
    else:
        os.rename(daemon.inbox / "sub", daemon.root / "moved-away")
        outside.mkdir()
        (outside / "talk.wav").write_bytes(speech(SENTENCES[3], "other").read_bytes())
    os.symlink(outside, daemon.inbox / "sub", target_is_directory=True)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    assert daemon.cli("cancel", str(busy.id)).returncode == 0

    job = daemon.wait_for_state("sub/talk.wav", JobState.FAILED, JobState.DONE)
    assert job.state is JobState.FAILED and "symbolic link" in (job.last_error or ""), job.last_error
    # The worker records failed, then handles the source, then logs job.failed:
    # only after that line has the source's handling had its chance to go wrong.
    daemon.wait_for_event("job.failed", job_id=job.id)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    assert [p for p in daemon.output.rglob("*") if "talk" in p.name] == []
    assert not list(daemon.done.rglob("talk*"))
    assert ffmpeg_for("talk.wav", within=daemon.root) == []
    assert daemon.process is not None and daemon.process.poll() is None
