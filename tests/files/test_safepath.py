"""Files under a folder opened and moved without following links above them,
and decoded from the descriptor that was checked."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES
from whisperd.errors import MediaError, OutputError
from whisperd.files import outputs, safepath
from whisperd.media import decode as media
from whisperd.media.decode import SAMPLE_RATE


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """inbox/sub/talk.wav, and an outside folder with its own talk.wav."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "sub").mkdir(parents=True)
    outside.mkdir()
    (inbox / "sub" / "talk.wav").write_bytes(b"inside")
    (outside / "talk.wav").write_bytes(b"outside")
    return inbox, outside


@pytest.mark.parametrize("depth", [1, 2])
def test_a_linked_folder_above_the_file_is_refused(tmp_path: Path, depth: int) -> None:
    inbox, outside = _tree(tmp_path)
    if depth == 2:
        (outside / "deeper").mkdir()
        (outside / "deeper" / "talk.wav").write_bytes(b"outside")
        (inbox / "a").mkdir()
        os.symlink(outside, inbox / "a" / "deeper")
        rel = "a/deeper/talk.wav"
    else:
        os.rename(inbox / "sub", tmp_path / "moved-away")
        os.symlink(outside, inbox / "sub")
        rel = "sub/talk.wav"
    with pytest.raises(OSError) as caught:
        safepath.open_source_beneath(str(inbox), rel)
    assert caught.value.errno == errno.ELOOP and safepath.REASON_LINK in str(caught.value)
    with pytest.raises(MediaError, match="symbolic link"), media.opened_source(str(inbox), rel):
        pass


def test_a_file_opens_and_a_final_link_inside_the_folder_is_followed(tmp_path: Path) -> None:
    inbox, outside = _tree(tmp_path)
    fd, via_link = safepath.open_source_beneath(str(inbox), "sub/talk.wav")
    assert os.read(fd, 10) == b"inside" and not via_link
    os.close(fd)
    os.symlink(inbox / "sub" / "talk.wav", inbox / "alias.wav")
    fd, via_link = safepath.open_source_beneath(str(inbox), "alias.wav")
    assert os.read(fd, 10) == b"inside" and via_link
    os.close(fd)
    os.symlink(outside / "talk.wav", inbox / "escape.wav")
    with pytest.raises(OSError, match="outside the inbox"):
        safepath.open_source_beneath(str(inbox), "escape.wav")


def test_a_file_swapped_in_is_not_the_jobs_file(tmp_path: Path) -> None:
    inbox, _outside = _tree(tmp_path)
    st = os.stat(inbox / "sub" / "talk.wav")
    (inbox / "new.wav").write_bytes(b"another")
    os.rename(inbox / "new.wav", inbox / "sub" / "talk.wav")
    with (
        pytest.raises(MediaError, match="different file"),
        media.opened_source(str(inbox), "sub/talk.wav", (st.st_dev, st.st_ino)),
    ):
        pass


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a", "flac", "ogg", "mp4"])
def test_decoding_from_the_descriptor_reads_that_file(
    tmp_path: Path, speech: Callable[..., Path], fmt: str
) -> None:
    """What ffmpeg reads is the open file, even once the path names another."""
    clip = speech(SENTENCES[0], "clip", fmt)
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    os.rename(clip, inbox / "sub" / f"talk.{fmt}")
    expected = media.decode_audio(str(inbox / "sub" / f"talk.{fmt}"))
    with media.opened_source(str(inbox), f"sub/talk.{fmt}") as fd:
        os.rename(inbox / "sub", tmp_path / "elsewhere")
        (inbox / "sub").mkdir()
        (inbox / "sub" / f"talk.{fmt}").write_bytes(b"not audio")
        info = media.check_source(str(inbox / "sub" / f"talk.{fmt}"), fd=fd)
        audio = media.decode_audio(str(inbox / "sub" / f"talk.{fmt}"), fd=fd)
    assert info.has_audio and info.duration_seconds > 1
    assert len(audio) == len(expected)


def test_moves_refuse_a_linked_folder_on_either_side(tmp_path: Path) -> None:
    inbox, outside = _tree(tmp_path)
    done = tmp_path / "done"
    done.mkdir()
    os.symlink(outside, done / "sub")
    with pytest.raises(OutputError, match="symbolic link"):
        outputs.move_source(str(inbox / "sub" / "talk.wav"), str(done), "sub/talk.wav")
    assert (inbox / "sub" / "talk.wav").read_bytes() == b"inside"
    assert sorted(os.listdir(outside)) == ["talk.wav"]

    os.rename(inbox / "sub", tmp_path / "moved-away")
    os.symlink(outside, inbox / "sub")
    with pytest.raises(OutputError, match="symbolic link"):
        outputs.move_source(str(inbox / "sub" / "talk.wav"), str(tmp_path / "done2"), "sub/talk.wav")
    assert (outside / "talk.wav").read_bytes() == b"outside"


def test_decode_stops_at_the_cap_on_what_is_actually_decoded(tmp_path: Path) -> None:
    """A sparse WAV declaring hours of audio: decoding stops once over the cap."""
    from tests.workers.test_children import sparse_wav

    wav = sparse_wav(tmp_path / "hours.wav", 1_900_000_000)
    with pytest.raises(MediaError, match="longer than 30 s"):
        media.decode_audio(str(wav), max_seconds=30.0)
    assert media.default_max_decode_seconds(1 << 30) == (1 << 30) / 4 / 8 / SAMPLE_RATE
