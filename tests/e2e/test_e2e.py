"""End to end: the real daemon, the real tiny.en model, real espeak-ng speech.

Each test is one `whisperd run` in a subprocess, fed the way a user feeds it
(files dropped into the inbox), and judged by what a user sees: transcripts
in output/, sources in done/ or failed/, the job store, the CLI. Transcripts
are checked against the spoken text (word error rate) and against
openai-whisper run in this process with the inbox's options (exact parity).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import opencc
import pytest
import srt
import webvtt

from tests.conftest import SENTENCES, SpeechFactory, wer
from tests.daemon_harness import DaemonUnderTest, running_daemon
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

ALL_FORMATS = ("txt", "srt", "vtt", "json", "tsv")
# The decoding options of an inbox that sets none (config.py's defaults), as
# openai-whisper's transcribe() takes them.
DEFAULT_OPTIONS: dict[str, Any] = {
    "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    "condition_on_previous_text": True,
    "language": None,
    "task": "transcribe",
    "initial_prompt": None,
    "word_timestamps": False,
}
# A transcript of clean synthetic speech is this close to the spoken text or
# something is wrong (tiny.en scores about 0.1-0.35 on espeak-ng voices).
WER_BOUND = 0.5
# Short sentences (2-3 s spoken) for tests about files rather than accuracy.
SHORT = (
    "Good morning everyone, and welcome to the weekly meeting.",
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the final report before Friday afternoon.",
    "It is raining again in the city today.",
    "My sister plays the piano every evening after dinner.",
)
# Mandarin for the OpenCC test. espeak-ng's plain "cmn" voice reads Chinese
# characters out as pinyin spelled in English; "cmn-latn-pinyin" speaks them.
MANDARIN = "今天天气很好。我们去公园散步。"
MANDARIN_VOICE = "cmn-latn-pinyin"

DaemonFactory = Callable[..., DaemonUnderTest]
Reference = Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    """reference(model_file, audio_file, **options) -> openai-whisper's result
    dict, computed in this process exactly as a user of the library would.

    torch runs on one thread, like the daemon's workers here (cpu_threads = 1),
    so both sides do the same arithmetic. Models stay loaded for the module.
    """
    import torch
    import whisper

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded: dict[Path, Any] = {}

    def transcribe(model_file: Path, audio_file: Path, **options: Any) -> dict[str, Any]:
        if model_file not in loaded:
            loaded[model_file] = whisper.load_model(str(model_file), device="cpu")
        audio = whisper.load_audio(str(audio_file))
        result: dict[str, Any] = whisper.transcribe(loaded[model_file], audio, fp16=False, **options)
        return result

    yield transcribe
    loaded.clear()
    torch.set_num_threads(threads)


def whisper_txt(result: dict[str, Any], tmp_path: Path) -> str:
    """The txt file openai-whisper's own writer makes from a result."""
    from whisper.utils import get_writer

    folder = tmp_path / "whisper-writer"
    folder.mkdir(exist_ok=True)
    get_writer("txt", str(folder))(result, "reference.wav")
    return (folder / "reference.txt").read_text(encoding="utf-8")


def wait_disposed(daemon: DaemonUnderTest, rel_path: str, state: JobState, timeout: float = 240.0) -> Job:
    """The job of rel_path once it has ended in `state` and its source was moved."""

    def disposed() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and job.state is state and job.disposed_at is not None

    daemon.wait_for(disposed, timeout=timeout, what=f"{rel_path} {state.value} and moved")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def outputs_by_format(job: Job) -> dict[str, Path]:
    return {Path(p).suffix.lstrip("."): Path(p) for p in job.outputs}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def assert_transcript_files_are_sound(job: Job, spoken: str) -> None:
    """txt close to what was said; srt, vtt, tsv parse and say the same; json
    carries openai-whisper's result plus whisperd's metadata."""
    files = outputs_by_format(job)
    assert sorted(files) == sorted(ALL_FORMATS)
    text = read(files["txt"])
    assert wer(spoken, text) < WER_BOUND, f"{job.spec.rel_path}: {text!r} is far from {spoken!r}"
    lines = text.splitlines()

    subtitles = list(srt.parse(read(files["srt"])))
    assert [s.content for s in subtitles] == lines
    assert all(s.start < s.end for s in subtitles)
    captions = webvtt.read(str(files["vtt"])).captions
    assert [c.text for c in captions] == lines
    rows = read(files["tsv"]).splitlines()
    assert rows[0] == "start\tend\ttext"
    assert [row.split("\t")[2] for row in rows[1:]] == lines

    document = json.loads(read(files["json"]))
    assert document["language"] == "en"
    assert " ".join(document["text"].split()) == " ".join(lines)
    assert document["segments"], "json has no segments"
    for segment in document["segments"]:
        assert {"start", "end", "text", "avg_logprob", "no_speech_prob"} <= set(segment)
        assert 0.0 <= segment["start"] <= segment["end"]
    meta = document["whisperd"]
    assert meta["source"] == job.spec.rel_path
    assert meta["model"] == "tiny.en"
    assert meta["device"] == "cpu"
    assert meta["audio_seconds"] > 1.0
    assert meta["transcribe_seconds"] > 0.0


# --------------------------------------------------------------------------- formats


# (container, with a video track): one of each kind users drop in.
MEDIA = (
    ("wav", False),
    ("mp3", False),
    ("flac", False),
    ("ogg", False),
    ("m4a", False),
    ("mp4", True),
    ("mkv", True),
    ("webm", True),
)
# Checked for exact parity with openai-whisper: plain audio, and a video's audio track.
PARITY_FORMATS = ("wav", "mp4")


def test_every_common_format_is_transcribed_in_one_run(
    daemon_factory: DaemonFactory,
    speech: SpeechFactory,
    reference: Reference,
    models_dir: Path,
    tmp_path: Path,
) -> None:
    daemon = daemon_factory()
    daemon.start()
    sources: dict[str, tuple[Path, str]] = {}
    for n, (fmt, video) in enumerate(MEDIA):
        # Full 8-15 s sentences where parity is checked, short ones elsewhere.
        spoken = SENTENCES[n % len(SENTENCES)] if fmt in PARITY_FORMATS else SHORT[n % len(SHORT)]
        clip = speech(spoken, f"clip_{fmt}", fmt, video=video)
        daemon.drop(clip)
        sources[clip.name] = (clip, spoken)

    for name, (_clip, spoken) in sources.items():
        job = wait_disposed(daemon, name, JobState.DONE)
        stem = Path(name).stem
        assert sorted(p.name for p in outputs_by_format(job).values()) == sorted(
            f"{stem}.{fmt}" for fmt in ALL_FORMATS
        )
        assert all(Path(p).parent == daemon.output for p in job.outputs)
        assert not (daemon.inbox / name).exists()
        assert (daemon.done / name).is_file()
        assert_transcript_files_are_sound(job, spoken)

    # The daemon's transcript is exactly openai-whisper's, for a plain audio
    # file and for the audio track of a video.
    for name in (f"clip_{fmt}.{fmt}" for fmt in PARITY_FORMATS):
        expected = reference(models_dir / "tiny.en.pt", sources[name][0], **DEFAULT_OPTIONS)
        parity_job = daemon.job_for(name)
        assert parity_job is not None
        assert read(outputs_by_format(parity_job)["txt"]) == whisper_txt(expected, tmp_path)
        assert json.loads(read(outputs_by_format(parity_job)["json"]))["text"] == expected["text"]

    status = daemon.cli("status")
    assert status.returncode == 0, status.stderr
    assert f"done {len(MEDIA)}" in status.stdout
    listing = daemon.cli("jobs")
    assert listing.returncode == 0, listing.stderr
    for name in sources:
        line = next(line for line in listing.stdout.splitlines() if line.endswith(f"main/{name}"))
        assert " done " in line


# --------------------------------------------------------------------------- files


def test_files_are_taken_skipped_mirrored_or_failed_as_a_user_expects(
    daemon_database_url: str | None, daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(database_url=daemon_database_url)
    inbox = daemon.inbox
    inbox.mkdir(parents=True)
    # Already waiting when the daemon starts.
    shutil.copyfile(speech(SHORT[0], "early"), inbox / "early.wav")
    # Never to be taken: other documents, and names that say "still being written".
    (inbox / "readme.txt").write_text("notes about the recordings\n", encoding="utf-8")
    (inbox / "slides.pdf").write_bytes(b"%PDF-1.4\n% not really a pdf\n")
    late = speech(SHORT[4], "late")
    shutil.copyfile(late, inbox / "late.wav.part")
    shutil.copyfile(late, inbox / "movie.mp4.crdownload")
    shutil.copyfile(late, inbox / ".hidden.wav")
    never_taken = ("readme.txt", "slides.pdf", "late.wav.part", "movie.mp4.crdownload", ".hidden.wav")
    daemon.start()

    assert wait_disposed(daemon, "early.wav", JobState.DONE).outputs
    assert (daemon.output / "early.txt").is_file()
    assert (daemon.done / "early.wav").is_file()

    # A text file posing as mp3, and an empty file: failed, with the reason.
    not_media = daemon.root / "notes.mp3"
    not_media.write_text("This is a shopping list, not a recording.\n", encoding="utf-8")
    empty = daemon.root / "empty.wav"
    empty.write_bytes(b"")
    daemon.drop(not_media)
    daemon.drop(empty)
    for name, reason in (("notes.mp3", "not a media file"), ("empty.wav", "file is empty")):
        job = wait_disposed(daemon, name, JobState.FAILED)
        assert job.last_error is not None and reason in job.last_error
        assert (daemon.failed / name).is_file()
        note = read(daemon.failed / f"{name}.error.txt")
        assert name in note and reason in note
        assert not (inbox / name).exists()

    # The daemon carries on: good files after the bad ones, in a subfolder
    # and two with one stem.
    talks = {"talk.wav": SHORT[1], "talk.mp3": SHORT[2], "a/b/talk.wav": SHORT[3]}
    for rel_path, spoken in talks.items():
        fmt = Path(rel_path).suffix.lstrip(".")
        clip = speech(spoken, f"talk-{fmt}-{len(Path(rel_path).parts)}", fmt)
        daemon.drop(clip, Path(rel_path).name, sub=str(Path(rel_path).parent))
    texts: dict[str, Path] = {}
    for rel_path, spoken in talks.items():
        job = wait_disposed(daemon, rel_path, JobState.DONE)
        txt = outputs_by_format(job)["txt"]
        texts[rel_path] = txt
        assert wer(spoken, read(txt)) < WER_BOUND, f"{rel_path} -> {txt}: {read(txt)!r}"
        assert (daemon.done / rel_path).is_file()
    assert texts["a/b/talk.wav"] == daemon.output / "a" / "b" / "talk.txt"
    assert sorted(p.name for p in (daemon.output / "a" / "b").iterdir()) == sorted(
        f"talk.{fmt}" for fmt in ALL_FORMATS
    )
    assert texts["talk.wav"] != texts["talk.mp3"]
    assert {texts["talk.wav"].parent, texts["talk.mp3"].parent} == {daemon.output}

    # Every ignored file was seen by the start-up scan; two more rescans, after
    # every job above had ended, walk the inbox again.
    daemon.wait_for_rescans(2)
    for name in never_taken:
        assert (inbox / name).is_file(), f"{name} was moved"
    # Still being written or hidden: not a job. Other documents: recorded once
    # as ignored, with the reason, and left where they are.
    for name in ("late.wav.part", "movie.mp4.crdownload", ".hidden.wav"):
        assert daemon.job_for(name) is None, f"{name} got a job"
    for name, suffix in (("readme.txt", ".txt"), ("slides.pdf", ".pdf")):
        assert [j.last_error for j in daemon.jobs() if j.spec.rel_path == name] == [
            f"unsupported extension {suffix}"
        ]
        assert [e["file"] for e in daemon.events("job.rejected")].count(name) == 1

    # Renamed to its final name, the download is taken.
    os.rename(inbox / "late.wav.part", inbox / "late.wav")
    job = wait_disposed(daemon, "late.wav", JobState.DONE)
    assert wer(SHORT[4], read(outputs_by_format(job)["txt"])) < WER_BOUND


# --------------------------------------------------------------------------- inbox options


def test_inbox_options_are_honoured_and_a_missing_model_fails_its_jobs_only(
    daemon_factory: DaemonFactory,
    speech: SpeechFactory,
    reference: Reference,
    models_dir: Path,
    tmp_path: Path,
) -> None:
    root = tmp_path / "d"
    options = {"language": "en", "beam_size": 2, "temperature": [0.0], "condition_on_previous_text": False}
    picky = DaemonUnderTest.default_inbox(root, "picky", formats=["txt", "json"], **options)
    nope = DaemonUnderTest.default_inbox(root, "nope", model="nope")
    daemon = daemon_factory(inboxes=[picky, nope])
    daemon.start()

    lost = speech(SHORT[0], "lost")
    shutil.copyfile(lost, Path(nope["path"]) / "lost.wav")
    job = wait_disposed(daemon, "lost.wav", JobState.FAILED)
    assert job.last_error is not None
    assert "whisperd models import" in job.last_error and "'nope'" in job.last_error
    assert "whisperd models import" in read(Path(nope["failed"]) / "lost.wav.error.txt")
    assert job.attempts == 1, "a missing model is not worth a retry"

    clip = speech(SENTENCES[2], "picky")
    daemon.drop(clip)  # the first inbox is the harness's main one: picky
    job = wait_disposed(daemon, "picky.wav", JobState.DONE)
    assert sorted(p.name for p in daemon.output.iterdir()) == ["picky.json", "picky.txt"]
    document = json.loads(read(daemon.output / "picky.json"))
    assert document["language"] == "en"
    assert document["whisperd"]["options"]["beam_size"] == 2
    assert document["whisperd"]["options"]["language"] == "en"
    expected = reference(
        models_dir / "tiny.en.pt",
        clip,
        temperature=(0.0,),
        beam_size=2,
        language="en",
        condition_on_previous_text=False,
    )
    assert read(daemon.output / "picky.txt") == whisper_txt(expected, tmp_path)
    assert wer(SENTENCES[2], expected["text"]) < WER_BOUND

    listing = daemon.cli("jobs")
    assert "whisperd models import" in listing.stdout
    models = daemon.cli("models", "list")
    assert models.returncode == 0, models.stderr
    assert any(line.startswith("tiny.en ") for line in models.stdout.splitlines())
    doctor = daemon.cli("doctor")
    assert "[ok  ] ffmpeg: ffmpeg version" in doctor.stdout
    # The inbox naming a model that is not there is what doctor flags.
    assert "[FAIL] model nope" in doctor.stdout and "whisperd models import" in doctor.stdout
    assert "[ok  ] model tiny.en" in doctor.stdout
    assert doctor.returncode == 1
    assert daemon.process is not None and daemon.process.poll() is None


# --------------------------------------------------------------------------- Chinese scripts


def test_chinese_option_converts_every_text_output(
    multilingual_models_dir: Path, speech: SpeechFactory, reference: Reference, tmp_path: Path
) -> None:
    """Mandarin speech, the multilingual base model, and an OpenCC conversion:
    every output holds exactly the converted in-process transcript."""
    clip = speech(MANDARIN, "mandarin", voice=MANDARIN_VOICE, speed=130)
    # Greedy, one temperature: espeak-ng's Mandarin is rough, and temperature
    # fallback on it costs minutes on two cores.
    options = {"language": "zh", "temperature": [0.0], "condition_on_previous_text": False}
    expected = reference(
        multilingual_models_dir / "base.pt",
        clip,
        language="zh",
        temperature=(0.0,),
        condition_on_previous_text=False,
    )
    assert expected["language"] == "zh"
    # Whisper writes simplified or traditional characters as it likes: convert
    # in whichever direction changes this transcript.
    config = next(
        (c for c in ("t2s", "s2t") if opencc.OpenCC(c).convert(expected["text"]) != expected["text"]), None
    )
    assert config is not None, f"no Chinese characters to convert in {expected['text']!r}"
    convert = opencc.OpenCC(config).convert
    segments = [convert(s["text"].strip()) for s in expected["segments"]]

    with running_daemon(
        tmp_path / "zh", multilingual_models_dir, inbox={"model": "base", "chinese": config, **options}
    ) as daemon:
        daemon.start()
        daemon.drop(clip)
        job = wait_disposed(daemon, "mandarin.wav", JobState.DONE)
    files = outputs_by_format(job)
    assert read(files["txt"]).splitlines() == segments
    document = json.loads(read(files["json"]))
    assert document["text"] == convert(expected["text"])
    assert [s["text"] for s in document["segments"]] == [convert(s["text"]) for s in expected["segments"]]
    assert document["whisperd"]["chinese"] == config
    assert [s.content for s in srt.parse(read(files["srt"]))] == segments
    assert [c.text for c in webvtt.read(str(files["vtt"])).captions] == segments
    assert [row.split("\t")[2] for row in read(files["tsv"]).splitlines()[1:]] == segments
