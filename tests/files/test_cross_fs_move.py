"""A source moved to a done/ or failed/ on another file system (a tmpfs,
another disk, a network share): whisperd copies it through the opened
destination folder, keeps its mode and times, and leaves exactly one copy;
a linked subfolder there is refused like on the same file system."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import missing_install
from whisperd.errors import OutputError
from whisperd.files import outputs

OTHER_FS_CANDIDATES = ("/dev/shm",)


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on another file system than tmp_path."""
    here = os.stat(tmp_path).st_dev
    for candidate in OTHER_FS_CANDIDATES:
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) and os.stat(candidate).st_dev != here:
            folder = Path(tempfile.mkdtemp(prefix="whisperd-test-", dir=candidate))
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
    # Under CI this fails instead of skipping: the move across file systems must be proven there.
    missing_install(f"no writable file system other than {tmp_path}'s among {OTHER_FS_CANDIDATES}")


def test_a_source_moves_across_file_systems_whole_with_its_mode_and_times(
    tmp_path: Path, other_fs: Path
) -> None:
    inbox = tmp_path / "inbox" / "2026"
    inbox.mkdir(parents=True)
    source = inbox / "talk.wav"
    content = os.urandom(3 * outputs.COPY_CHUNK_BYTES + 17)
    source.write_bytes(content)
    source.chmod(0o640)
    os.utime(source, ns=(1_700_000_000_000_000_000, 1_700_000_123_000_000_000))

    moved = outputs.move_source(str(source), str(other_fs / "done"), "2026/talk.wav")

    assert moved == str(other_fs / "done" / "2026" / "talk.wav")
    assert not source.exists()
    target = Path(moved)
    assert target.read_bytes() == content
    assert target.stat().st_mode & 0o777 == 0o640
    assert target.stat().st_mtime_ns == 1_700_000_123_000_000_000
    # No temp file left beside it.
    assert sorted(p.name for p in target.parent.iterdir()) == ["talk.wav"]
    # Moved again under the same name: a second copy, never an overwrite.
    source.write_bytes(b"second")
    again = outputs.move_source(str(source), str(other_fs / "done"), "2026/talk.wav")
    assert Path(again).name == "talk (2).wav" and Path(again).read_bytes() == b"second"
    assert target.read_bytes() == content


def test_a_linked_job_moves_across_file_systems_as_a_link(tmp_path: Path, other_fs: Path) -> None:
    real = tmp_path / "recordings" / "talk.wav"
    real.parent.mkdir()
    real.write_bytes(b"audio")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "talk.wav").symlink_to(real)

    moved = Path(outputs.move_source(str(inbox / "talk.wav"), str(other_fs / "done"), "talk.wav"))

    assert moved.is_symlink() and os.readlink(moved) == str(real)
    assert real.read_bytes() == b"audio", "the file the link points at is left alone"
    assert not (inbox / "talk.wav").exists() and not (inbox / "talk.wav").is_symlink()


def test_a_linked_subfolder_on_the_other_file_system_gets_nothing(tmp_path: Path, other_fs: Path) -> None:
    inbox = tmp_path / "inbox" / "sub"
    inbox.mkdir(parents=True)
    source = inbox / "talk.wav"
    source.write_bytes(b"audio")
    outside = tmp_path / "outside"
    outside.mkdir()
    (other_fs / "done").mkdir()
    (other_fs / "done" / "sub").symlink_to(outside, target_is_directory=True)

    with pytest.raises(OutputError) as raised:
        outputs.move_source(str(source), str(other_fs / "done"), "sub/talk.wav")

    assert str(source) in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ELOOP
    assert source.read_bytes() == b"audio", "the source stays where it was"
    assert list(outside.iterdir()) == []
