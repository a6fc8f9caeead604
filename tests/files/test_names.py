"""Names derived from a source name near NAME_MAX (255 bytes) still fit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from whisperd.files import atomic as atomic_files
from whisperd.files import outputs
from whisperd.files.names import NAME_MAX, fit_name, name_bytes, split_ext
from whisperd.lifecycle import remove_outputs

# Stems that make a name of 250-255 bytes with `.wav`: ASCII, CJK (3 bytes a
# character), and a mix whose cut falls inside a multi-byte character.
LONG_STEMS = ["a" * 251, "录音" * 41 + "ab", "é" * 125 + "x", "x" + "会" * 83]


@pytest.mark.parametrize("stem", LONG_STEMS)
@pytest.mark.parametrize("suffix", [".wav.error.txt", " (2).wav", ".wav.json", ""])
def test_fit_name_fits_keeps_suffix_and_whole_characters(stem: str, suffix: str) -> None:
    fitted = fit_name(stem, suffix)
    assert name_bytes(fitted) <= NAME_MAX
    assert fitted.endswith(suffix)
    assert os.fsencode(fitted).decode("utf-8") == fitted  # no character was split
    assert fitted == fit_name(stem, suffix)  # deterministic


def test_fit_name_leaves_short_names_alone() -> None:
    assert fit_name("talk", ".mp3.error.txt") == "talk.mp3.error.txt"
    assert fit_name("x" * 245, ".wav") == "x" * 245 + ".wav"


def test_long_names_sharing_a_prefix_stay_different() -> None:
    first, second = fit_name("a" * 300 + "1", ".wav"), fit_name("a" * 300 + "2", ".wav")
    assert first != second
    assert name_bytes(first) == name_bytes(second) == NAME_MAX


def test_a_suffix_too_long_to_keep_is_cut_too() -> None:
    fitted = fit_name("talk", "." + "z" * 300)
    assert name_bytes(fitted) <= NAME_MAX and fitted.startswith("talk.zzz")


def test_split_ext_keeps_an_implausible_extension_in_the_stem() -> None:
    assert split_ext("talk.mp3") == ("talk", ".mp3")
    assert split_ext("a." + "b" * 40) == ("a." + "b" * 40, "")


@pytest.mark.parametrize("stem", LONG_STEMS)
def test_error_note_and_numbered_moves_fit(tmp_path: Path, stem: str) -> None:
    name = f"{stem}.wav"
    assert 250 <= name_bytes(name) <= NAME_MAX
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    moved = []
    for _ in range(3):  # the same name three times: `NAME`, `NAME (2)`, `NAME (3)`
        (inbox / name).write_bytes(b"RIFF")
        moved.append(outputs.move_source(str(inbox / name), str(done), name))
    assert moved[0] == str(done / name)
    assert len(set(moved)) == 3 and all(Path(p).is_file() for p in moved)
    assert all(p.endswith(".wav") for p in moved)
    assert " (2).wav" in moved[1] and " (3).wav" in moved[2]
    note = outputs.write_error_note(str(tmp_path / "failed"), f"sub/{name}", "broken", {})
    assert note.endswith(".wav.error.txt") and "broken" in Path(note).read_text(encoding="utf-8")


@pytest.mark.parametrize("stem", LONG_STEMS)
def test_outputs_of_a_long_name_fit_and_renumber(tmp_path: Path, stem: str) -> None:
    name = f"{stem}.m4a"
    formats = ["txt", "json", "tsv"]
    taken: set[str] = set()
    bases = []
    for _ in range(3):  # each later source finds the earlier outputs taken
        base = outputs.choose_output_base(str(tmp_path), name, formats, lambda p: p in taken)
        paths = outputs.write_outputs(base, {fmt: b"text" for fmt in formats})
        taken.update(paths)
        bases.append(base)
    assert len(set(bases)) == 3
    assert all(name_bytes(Path(p).name) <= NAME_MAX for p in taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in taken)
    # Removing a job's outputs also removes the temp files a crash left for them.
    target = sorted(taken)[0]
    leftover = atomic_files.temp_path_for(target)
    Path(leftover).write_bytes(b"")
    remove_outputs([target])
    assert not os.path.lexists(leftover) and not os.path.lexists(target)
