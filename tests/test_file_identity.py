"""FileIdentity.same_file: what every "is this still the queued file?" check relies on."""

from __future__ import annotations

import os
from pathlib import Path

from whisperd.jobs import FileIdentity


def test_a_renamed_and_rewritten_file_is_still_the_same_file(tmp_path: Path) -> None:
    talk = tmp_path / "talk.mp3"
    talk.write_bytes(b"first take")
    queued = FileIdentity.of(str(talk))
    moved = tmp_path / "sub"
    moved.mkdir()
    os.rename(talk, moved / "renamed.mp3")
    with open(moved / "renamed.mp3", "ab") as stream:
        stream.write(b" and more")
    now = FileIdentity.of(str(moved / "renamed.mp3"))
    assert now.same_file(queued)
    assert not now.same_content(queued)


def test_a_file_replaced_under_its_name_is_another_file(tmp_path: Path) -> None:
    talk = tmp_path / "talk.mp3"
    talk.write_bytes(b"first take")
    queued = FileIdentity.of(str(talk))
    # The old file stays (under another name), so its inode cannot be reused.
    os.rename(talk, tmp_path / "old.mp3")
    talk.write_bytes(b"first take")
    assert not FileIdentity.of(str(talk)).same_file(queued)
    assert FileIdentity.of(str(tmp_path / "old.mp3")).same_file(queued)


def test_a_hard_link_is_the_same_file(tmp_path: Path) -> None:
    talk = tmp_path / "talk.mp3"
    talk.write_bytes(b"speech")
    os.link(talk, tmp_path / "link.mp3")
    assert FileIdentity.of(str(tmp_path / "link.mp3")).same_file(FileIdentity.of(str(talk)))
