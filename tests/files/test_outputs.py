"""whisperd.files.outputs on real files: renderers checked with the real srt and
webvtt parsers, failures produced by the kernel (permissions, file size limit,
a tiny tmpfs), moves across real file systems."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import srt
import webvtt

from whisperd.errors import OutputError
from whisperd.files.atomic import TMP_MARKER, write_atomic
from whisperd.files.outputs import (
    choose_output_base,
    convert_result,
    make_converter,
    move_source,
    remove_stale_temps,
    render_json,
    render_outputs,
    render_srt,
    render_tsv,
    render_txt,
    render_vtt,
    write_error_note,
    write_outputs,
)
from whisperd.jobs import (
    AttemptEnd,
    AttemptOutcome,
    FileIdentity,
    JobSpec,
    Segment,
    TranscriptResult,
    Word,
)
from whisperd.store.job_store import JobStore

REPO = Path(__file__).resolve().parents[2]
TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[0-9a-f]+" + re.escape(TMP_MARKER) + "$")


def _segment(
    index: int,
    start: float,
    end: float,
    text: str,
    tokens: tuple[int, ...] = (),
    words: tuple[Word, ...] = (),
) -> Segment:
    return Segment(
        id=index,
        start=start,
        end=end,
        text=text,
        avg_logprob=-0.25,
        no_speech_prob=0.01,
        tokens=tokens,
        words=words,
    )


RESULT = TranscriptResult(
    text=" Hello world. 你好世界 🎉 ...",
    language="en",
    segments=(
        _segment(
            0,
            0.0,
            1.25,
            " Hello world.",
            tokens=(50364, 2425, 1002),
            words=(
                Word(word=" Hello", start=0.0, end=0.5, probability=0.91),
                Word(word=" world.", start=0.5, end=1.25, probability=0.87),
            ),
        ),
        _segment(1, 1.25, 3.5, " 你好世界 🎉"),
        _segment(2, 3.5, 4.0, "   "),
        _segment(3, 4.0, 6.0, " First line\n\n\n  second line  "),
        _segment(4, 6.0, 7.0, " a --> b <i>not a tag</i> & more"),
        _segment(5, 360000.25, 360001.5, " after a hundred hours"),
    ),
)

# What each non-empty segment shows as a cue: (start ms, end ms, text).
EXPECTED_CUES = [
    (0, 1250, "Hello world."),
    (1250, 3500, "你好世界 🎉"),
    (4000, 6000, "First line\nsecond line"),
    (6000, 7000, "a \u2192 b <i>not a tag</i> & more"),
    (360000250, 360001500, "after a hundred hours"),
]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run_child(code: str, *args: str, expect_rc: int = 0) -> dict[str, object]:
    """Run a Python snippet in a fresh process (so rlimits, uids and mounts
    stay there) and return the JSON it prints."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == expect_rc, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


# ---------------------------------------------------------------- renderers


def test_srt_parses_with_the_srt_library_and_matches_the_segments(tmp_path: Path) -> None:
    [path] = write_outputs(str(tmp_path / "talk"), {"srt": render_srt(RESULT).encode()})

    subtitles = list(srt.parse(Path(path).read_text(encoding="utf-8")))

    assert [s.index for s in subtitles] == [1, 2, 3, 4, 5]
    assert [(s.start, s.end, s.content) for s in subtitles] == [
        (timedelta(milliseconds=start), timedelta(milliseconds=end), text)
        for start, end, text in EXPECTED_CUES
    ]


def test_srt_and_vtt_timestamps_use_their_own_formats() -> None:
    srt_text, vtt_text = render_srt(RESULT), render_vtt(RESULT)

    assert "00:00:00,000 --> 00:00:01,250\nHello world.\n" in srt_text
    assert "100:00:00,250 --> 100:00:01,500\n" in srt_text
    assert vtt_text.startswith("WEBVTT\n\n")
    assert "00:00:00.000 --> 00:00:01.250\nHello world.\n" in vtt_text
    assert "100:00:00.250 --> 100:00:01.500\n" in vtt_text


def test_vtt_parses_with_webvtt_and_matches_the_segments(tmp_path: Path) -> None:
    [path] = write_outputs(str(tmp_path / "talk"), {"vtt": render_vtt(RESULT).encode()})

    captions = webvtt.read(path, strict=True).captions

    # `<` and `&` are escaped, so the parser sees no tags and the text comes
    # back whole once the entities are decoded.
    assert [
        (c.start_time.in_milliseconds(), c.end_time.in_milliseconds(), html.unescape(c.text))
        for c in captions
    ] == EXPECTED_CUES


def test_cue_end_never_precedes_its_start() -> None:
    backwards = TranscriptResult(text="x", language="en", segments=(_segment(0, 5.0, 4.0, " x"),))

    [subtitle] = srt.parse(render_srt(backwards))

    assert subtitle.start == subtitle.end == timedelta(seconds=5)


def test_tsv_has_integer_milliseconds_and_one_row_per_spoken_segment() -> None:
    tabbed = TranscriptResult(
        text="", language="en", segments=(*RESULT.segments, _segment(6, 8.0, 9.0, " tab\there\nnewline"))
    )

    rows = list(csv.reader(io.StringIO(render_tsv(tabbed)), delimiter="\t"))

    assert rows[0] == ["start", "end", "text"]
    assert rows[1:] == [
        ["0", "1250", "Hello world."],
        ["1250", "3500", "你好世界 🎉"],
        ["4000", "6000", "First line second line"],
        ["6000", "7000", "a --> b <i>not a tag</i> & more"],
        ["360000250", "360001500", "after a hundred hours"],
        ["8000", "9000", "tab here newline"],
    ]


def test_txt_has_one_line_per_spoken_segment() -> None:
    assert render_txt(RESULT).splitlines() == [
        "Hello world.",
        "你好世界 🎉",
        "First line second line",
        "a --> b <i>not a tag</i> & more",
        "after a hundred hours",
    ]


def test_txt_without_segments_falls_back_to_the_full_text() -> None:
    assert render_txt(TranscriptResult(text="  just text ", language="en", segments=())) == "just text\n"


def test_json_round_trips_the_whisper_result_and_carries_metadata(tmp_path: Path) -> None:
    metadata = {"source": "sub/talk.mp3", "model": "tiny.en", "device": "cpu", "audio_seconds": 7.0}
    [path] = write_outputs(str(tmp_path / "talk"), {"json": render_json(RESULT, metadata).encode()})

    raw = Path(path).read_bytes()
    loaded = json.loads(raw)

    assert "你好世界 🎉".encode() in raw  # real UTF-8, not \u escapes
    assert loaded["whisperd"] == metadata
    assert {k: v for k, v in loaded.items() if k != "whisperd"} == RESULT.to_dict()
    assert loaded["segments"][0]["words"][1] == {
        "word": " world.",
        "start": 0.5,
        "end": 1.25,
        "probability": 0.87,
    }
    assert TranscriptResult.from_whisper(loaded) == RESULT


def test_json_writes_null_for_non_finite_numbers() -> None:
    odd = TranscriptResult(
        text="x",
        language="en",
        segments=(Segment(id=0, start=0, end=1, text="x", avg_logprob=float("-inf"), no_speech_prob=0.1),),
    )

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    loaded = json.loads(render_json(odd, {}), parse_constant=refuse)

    assert loaded["segments"][0]["avg_logprob"] is None


def test_render_outputs_renders_the_requested_formats_as_utf8() -> None:
    contents = render_outputs(RESULT, ["txt", "srt", "vtt", "json", "tsv"], {"model": "tiny.en"})

    assert list(contents) == ["txt", "srt", "vtt", "json", "tsv"]
    assert contents["srt"].decode("utf-8") == render_srt(RESULT)
    assert json.loads(contents["json"])["whisperd"] == {"model": "tiny.en"}


def test_render_outputs_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match=r"'docx'.*txt, srt, vtt, json, tsv"):
        render_outputs(RESULT, ["txt", "docx"], {})


# ---------------------------------------------------------------- Chinese scripts


def test_opencc_converters_change_characters() -> None:
    assert make_converter("t2s")("漢語") == "汉语"
    assert make_converter("s2t")("汉语") == "漢語"
    assert make_converter("s2twp")("软件和鼠标") == "軟體和滑鼠"
    assert make_converter("")("漢語 汉语") == "漢語 汉语"


def test_every_conversion_the_config_accepts_converts() -> None:
    # The config's list is the one list: an inbox may name each of them, and
    # every one must work when its job ends.
    from whisperd.config import CHINESE_CONFIGS

    for config in CHINESE_CONFIGS:
        assert isinstance(make_converter(config)("漢語 汉语"), str)
    with pytest.raises(ValueError, match="hk2sp"):
        make_converter("hk2sp")  # opencc ships it, but no inbox can ask for it


def test_unknown_opencc_config_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'zh-classic'.*\bs2t\b.*\bt2s\b") as info:
        make_converter("zh-classic")
    for name in ("s2tw", "tw2s", "s2hk", "hk2s", "s2twp", "tw2sp"):
        assert name in str(info.value)


def test_convert_result_converts_text_segments_and_words() -> None:
    traditional = TranscriptResult(
        text="漢語軟體",
        language="zh",
        segments=(
            _segment(
                0,
                0.0,
                1.0,
                "漢語軟體",
                words=(
                    Word(word="漢語", start=0.0, end=0.5, probability=0.9),
                    Word(word="軟體", start=0.5, end=1.0, probability=0.9),
                ),
            ),
        ),
    )

    converted = convert_result(traditional, make_converter("t2s"))

    assert converted.text == "汉语软体"
    assert converted.segments[0].text == "汉语软体"
    assert [w.word for w in converted.segments[0].words] == ["汉语", "软体"]
    assert converted.segments[0].start == 0.0 and converted.segments[0].words[1].end == 1.0
    assert "汉语软体" in render_srt(converted)


# ---------------------------------------------------------------- naming and writing outputs


class PublishingStore:
    """A real SQLite job store; publish() runs one real job through claim,
    output naming (asking the store who owns a path, as the worker does),
    writing, and done."""

    def __init__(self, root: Path) -> None:
        self.store = JobStore.open(f"sqlite:///{root}/jobs.db")
        self.inbox = root / "inbox"
        self._made = 0

    def publish(self, output_dir: Path, rel_path: str, formats: list[str]) -> list[str]:
        self._made += 1
        spec = JobSpec(
            inbox="main",
            inbox_root=str(self.inbox),
            rel_path=rel_path,
            model="tiny.en",
            formats=tuple(formats),
            output_dir=str(output_dir),
        )
        identity = FileIdentity(device=1, inode=self._made, size=5, mtime_ns=self._made)
        job, created = self.store.enqueue(spec, identity, max_attempts=1)
        claim = self.store.claim(worker="w", device="cpu", lease_seconds=600)
        assert created and claim is not None and claim.job.id == job.id

        def is_taken(path: str) -> bool:
            owner = self.store.output_owner(path)
            return owner is not None and owner != rel_path

        base = choose_output_base(str(output_dir), rel_path, formats, is_taken)
        assert self.store.set_outputs(job.id, claim.token, [f"{base}.{fmt}" for fmt in formats])
        paths = write_outputs(base, {fmt: f"{rel_path} {fmt}\n".encode() for fmt in formats})
        assert self.store.end_attempt(
            job.id, claim.token, AttemptEnd(outcome=AttemptOutcome.DONE, outputs=tuple(paths))
        )
        return paths


@pytest.fixture
def publishing(tmp_path: Path) -> Iterator[PublishingStore]:
    made = PublishingStore(tmp_path)
    yield made
    made.store.close()


def test_sources_sharing_a_stem_get_distinct_outputs(tmp_path: Path, publishing: PublishingStore) -> None:
    store, out = publishing, tmp_path / "output"

    mp3 = store.publish(out, "talk.mp3", ["txt", "srt"])
    wav = store.publish(out, "talk.wav", ["txt", "srt"])
    mp3_again = store.publish(out, "talk.mp3", ["txt", "srt"])

    assert mp3 == mp3_again == [str(out / "talk.txt"), str(out / "talk.srt")]
    assert wav == [str(out / "talk.wav.txt"), str(out / "talk.wav.srt")]
    assert (out / "talk.txt").read_text() == "talk.mp3 txt\n"
    assert (out / "talk.wav.srt").read_text() == "talk.wav srt\n"
    assert _listing(out) == ["talk.srt", "talk.txt", "talk.wav.srt", "talk.wav.txt"]


def test_numbered_names_when_the_source_name_is_taken_too() -> None:
    taken = {"/out/talk.json", "/out/talk.mp3.txt", "/out/talk.mp3.2.json"}

    base = choose_output_base("/out", "talk.mp3", ["txt", "json"], taken.__contains__)

    assert base == "/out/talk.mp3.3"


def test_a_name_without_extension_moves_straight_to_numbers() -> None:
    base = choose_output_base("/out", "README", ["txt"], {"/out/README.txt"}.__contains__)

    assert base == "/out/README.2"


def test_subfolders_are_mirrored(tmp_path: Path, publishing: PublishingStore) -> None:
    store, out = publishing, tmp_path / "output"

    paths = store.publish(out, "team/2024/talk.mp3", ["txt", "vtt"])

    assert paths == [str(out / "team/2024/talk.txt"), str(out / "team/2024/talk.vtt")]
    assert (out / "team/2024/talk.vtt").read_text() == "team/2024/talk.mp3 vtt\n"


@pytest.mark.parametrize("rel_path", ["/etc/passwd", "../talk.mp3", "sub/../../talk.mp3", "..", "", "."])
def test_paths_that_leave_their_folder_are_refused(tmp_path: Path, rel_path: str) -> None:
    source = tmp_path / "talk.mp3"
    source.write_bytes(b"audio")

    with pytest.raises(ValueError, match=r"relative|'\.\.'|does not name"):
        choose_output_base(str(tmp_path / "out"), rel_path, ["txt"], lambda _path: False)
    with pytest.raises(ValueError):
        move_source(str(source), str(tmp_path / "done"), rel_path)
    with pytest.raises(ValueError):
        write_error_note(str(tmp_path / "failed"), rel_path, "bad", {})
    assert source.exists()
    assert _listing(tmp_path) == ["talk.mp3"]


def test_write_atomic_creates_folders_and_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "talk.txt"

    write_atomic(str(target), b"first")
    write_atomic(str(target), "second, longer 字".encode())

    assert target.read_text(encoding="utf-8") == "second, longer 字"
    assert _listing(tmp_path) == ["a", "a/b", "a/b/talk.txt"]


def test_write_outputs_removes_what_it_placed_when_a_later_rename_fails(tmp_path: Path) -> None:
    # talk.json is a non-empty folder, so renaming the json output onto it fails
    # after talk.txt is already in place.
    (tmp_path / "talk.json").mkdir()
    (tmp_path / "talk.json" / "keep").write_text("x")

    with pytest.raises(OutputError) as info:
        write_outputs(str(tmp_path / "talk"), {"txt": b"text", "json": b"{}"})

    assert info.value.path == str(tmp_path / "talk.json")
    assert str(tmp_path / "talk.json") in str(info.value)
    assert _listing(tmp_path) == ["talk.json", "talk.json/keep"]


def test_unwritable_folder_gives_permission_denied_and_leaves_nothing(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "existing.txt").write_text("old")
    locked.chmod(0o555)
    try:
        # root ignores folder permissions, so the child drops to `nobody`
        # (after chdir, as the pytest base folder is private to root).
        results = _run_child(
            """
            import json, os, sys
            from whisperd.errors import OutputError
            from whisperd.files.atomic import write_atomic
            os.chdir(sys.argv[1])
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            results = {}
            for rel in ("new.txt", "sub/new.txt", "existing.txt"):
                try:
                    write_atomic(rel, b"new content")
                    results[rel] = "written"
                except OutputError as exc:
                    results[rel] = [exc.path, exc.reason, str(exc)]
            print(json.dumps(results))
            """,
            str(locked),
        )
    finally:
        locked.chmod(0o755)

    assert results == {
        rel: [rel, "permission denied", f"{rel}: permission denied"]
        for rel in ("new.txt", "sub/new.txt", "existing.txt")
    }
    assert _listing(locked) == ["existing.txt"]
    assert (locked / "existing.txt").read_text() == "old"


def test_file_size_limit_keeps_old_outputs_and_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "talk.txt").write_text("old transcript")

    # With SIGXFSZ ignored, writing past RLIMIT_FSIZE fails with EFBIG, the
    # same path through the code as a full disk.
    results = _run_child(
        """
        import json, os, resource, signal, sys
        from whisperd.errors import OutputError
        from whisperd.files.atomic import write_atomic
        from whisperd.files.outputs import write_outputs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        folder = sys.argv[1]
        results = {}
        try:
            write_atomic(os.path.join(folder, "talk.txt"), b"x" * 100_000)
        except OutputError as exc:
            results["atomic"] = [exc.path, exc.reason]
        try:
            write_outputs(os.path.join(folder, "talk"), {"srt": b"small", "json": b"y" * 100_000})
        except OutputError as exc:
            results["outputs"] = [exc.path, exc.reason]
        print(json.dumps(results))
        """,
        str(tmp_path),
    )

    assert results == {
        "atomic": [str(tmp_path / "talk.txt"), "File too large"],
        "outputs": [str(tmp_path / "talk.json"), "File too large"],
    }
    assert _listing(tmp_path) == ["talk.txt"]
    assert (tmp_path / "talk.txt").read_text() == "old transcript"


@pytest.fixture
def tiny_fs_command(tmp_path: Path) -> Iterator[list[str]]:
    """A command prefix that runs its program with a 64 KiB tmpfs mounted on
    tmp_path/tiny, in a private mount namespace that ends with the process."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    unshare = (
        ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    )
    prefix = [
        *unshare,
        "sh",
        "-c",
        'mount -t tmpfs -o size=64k whisperd-test "$0" && exec "$@"',
        str(mount_point),
    ]
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    yield prefix


def test_full_disk_says_disk_full_and_keeps_the_old_file(tiny_fs_command: list[str], tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        from whisperd.errors import OutputError
        from whisperd.files.atomic import write_atomic
        target = os.path.join(sys.argv[1], "talk.txt")
        write_atomic(target, b"old transcript")
        try:
            write_atomic(target, b"z" * 1_000_000)
            reason = "written"
        except OutputError as exc:
            reason = exc.reason
        with open(target, "rb") as f:
            kept = f.read().decode()
        print(json.dumps({"reason": reason, "listing": sorted(os.listdir(sys.argv[1])), "kept": kept}))
        """
    )
    proc = subprocess.run(
        [*tiny_fs_command, sys.executable, "-c", code, str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    assert json.loads(proc.stdout) == {
        "reason": "disk full",
        "listing": ["talk.txt"],
        "kept": "old transcript",
    }


# ---------------------------------------------------------------- stale temps


def test_a_writer_killed_mid_write_leaves_only_a_marked_temp_that_is_swept(tmp_path: Path) -> None:
    out = tmp_path / "output" / "sub"
    out.mkdir(parents=True)
    # SIGXFSZ at its default action kills the writer as soon as it passes the
    # size limit: a crash in the middle of writing an output.
    _run_child(
        """
        import resource, signal, sys
        from whisperd.files.atomic import write_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        write_atomic(sys.argv[1], b"x" * 100_000)
        """,
        str(out / "talk.txt"),
        expect_rc=-signal.SIGXFSZ,
    )

    [leftover] = os.listdir(out)
    match = TEMP_NAME.match(leftover)
    assert match is not None and match["final"] == "talk.txt"
    assert (out / leftover).stat().st_size == 4096

    assert remove_stale_temps(str(tmp_path / "output")) == [str(out / leftover)]
    assert os.listdir(out) == []


def test_remove_stale_temps_removes_only_marked_temps(tmp_path: Path) -> None:
    stale = [tmp_path / f".talk.txt.0a1b{TMP_MARKER}", tmp_path / "a" / "b" / f".x.json.ff{TMP_MARKER}"]
    kept = [
        tmp_path / "talk.txt",
        tmp_path / ".hidden",
        tmp_path / f"nodot{TMP_MARKER}",
        tmp_path / "a" / "b.srt",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")

    removed = remove_stale_temps(str(tmp_path))

    assert removed == sorted(str(p) for p in stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temps(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------- error notes


def test_error_note_says_which_file_why_and_when(tmp_path: Path) -> None:
    before = datetime.now().astimezone().replace(microsecond=0)

    path = write_error_note(
        str(tmp_path / "failed"),
        "sub/talk.mp3",
        "ffprobe: Invalid data found when processing input\nno audio stream",
        {"Attempts": "3 of 3", "Model": "tiny.en", "Job": "17"},
    )

    assert path == str(tmp_path / "failed" / "sub" / "talk.mp3.error.txt")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "whisperd could not transcribe this file."
    fields = {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if re.match(r"^\w+:", line)
    }
    assert fields["File"] == "sub/talk.mp3"
    assert fields["Reason"] == "ffprobe: Invalid data found when processing input"
    assert fields["Attempts"] == "3 of 3" and fields["Model"] == "tiny.en" and fields["Job"] == "17"
    assert before <= datetime.fromisoformat(fields["When"]) <= datetime.now().astimezone()
    # The reason's second line stays with the reason, indented under it.
    assert (
        lines[lines.index(next(x for x in lines if x.startswith("Reason:"))) + 1].strip() == "no audio stream"
    )
    assert _listing(tmp_path / "failed") == ["sub", "sub/talk.mp3.error.txt"]


# ---------------------------------------------------------------- moving the source


def test_move_source_mirrors_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "team" / "talk.mp3"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"audio")

    final = move_source(str(src), str(tmp_path / "done"), "team/talk.mp3")

    assert final == str(tmp_path / "done" / "team" / "talk.mp3")
    assert Path(final).read_bytes() == b"audio"
    assert not src.exists()


def test_move_source_never_overwrites(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "talk.mp3").write_bytes(b"earlier")
    finals = []
    for round_ in range(2):
        src = tmp_path / "inbox" / "talk.mp3"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(f"drop {round_}".encode())
        finals.append(move_source(str(src), str(done), "talk.mp3"))

    assert finals == [str(done / "talk (2).mp3"), str(done / "talk (3).mp3")]
    assert [(done / n).read_bytes() for n in ("talk.mp3", "talk (2).mp3", "talk (3).mp3")] == [
        b"earlier",
        b"drop 0",
        b"drop 1",
    ]


def test_move_source_moves_a_symlink_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "library" / "talk.mp3"
    target.parent.mkdir()
    target.write_bytes(b"audio")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "talk.mp3").symlink_to(target)
    (inbox / "dangling.mp3").symlink_to(tmp_path / "nowhere.mp3")

    moved = move_source(str(inbox / "talk.mp3"), str(tmp_path / "done"), "talk.mp3")
    dangling = move_source(str(inbox / "dangling.mp3"), str(tmp_path / "done"), "dangling.mp3")

    assert os.readlink(moved) == str(target) and Path(moved).is_symlink()
    assert os.readlink(dangling) == str(tmp_path / "nowhere.mp3")
    assert target.read_bytes() == b"audio"
    assert os.listdir(inbox) == []


def test_move_source_of_a_vanished_file_says_so(tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "talk.mp3"

    with pytest.raises(OutputError, match="gone") as info:
        move_source(str(src), str(tmp_path / "done"), "talk.mp3")

    assert info.value.path == str(src) and str(src) in str(info.value)
    assert not (tmp_path / "done").exists() or _listing(tmp_path / "done") == []


@pytest.fixture
def other_fs_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a different file system than tmp_path (/dev/shm is tmpfs)."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to move across")
    folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="whisperd-test-"))
    yield folder
    shutil.rmtree(folder)


def test_move_source_across_file_systems_copies_then_unlinks(tmp_path: Path, other_fs_folder: Path) -> None:
    src = other_fs_folder / "talk.mp3"
    src.write_bytes(b"audio" * 1000)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    link = other_fs_folder / "link.mp3"
    link.symlink_to("/srv/library/talk.mp3")
    done = tmp_path / "done"
    done.mkdir()
    (done / "talk.mp3").write_bytes(b"earlier")

    final = move_source(str(src), str(done), "talk.mp3")
    moved_link = move_source(str(link), str(done), "link.mp3")

    assert final == str(done / "talk (2).mp3")
    assert Path(final).read_bytes() == b"audio" * 1000
    assert Path(final).stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert os.readlink(moved_link) == "/srv/library/talk.mp3"
    assert os.listdir(other_fs_folder) == []
    assert _listing(done) == ["link.mp3", "talk (2).mp3", "talk.mp3"]


def test_json_keeps_every_segment_field_whisper_gives_including_seek() -> None:
    whisper_result = {
        "text": " Hello again.",
        "language": "en",
        "segments": [
            {
                "id": 0,
                "seek": 3000,
                "start": 30.0,
                "end": 31.5,
                "text": " Hello again.",
                "tokens": [50364, 2425],
                "temperature": 0.0,
                "avg_logprob": -0.3,
                "compression_ratio": 0.8,
                "no_speech_prob": 0.02,
            }
        ],
    }
    loaded = json.loads(render_json(TranscriptResult.from_whisper(whisper_result), {}))
    assert {k: v for k, v in loaded.items() if k != "whisperd"} == whisper_result
