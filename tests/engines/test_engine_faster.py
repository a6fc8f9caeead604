"""The faster-whisper engine end to end: the real daemon, the real tiny.en
(the bundled CTranslate2 folder, loaded by faster-whisper as it is), real
espeak-ng speech. Transcripts are checked against the spoken text (word
error rate) and against faster-whisper run in this process on the same
samples with the same options (exact parity); cancel, progress, the models
folder and the refusals a user meets at start are checked as a user sees them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import srt
import webvtt

from tests.conftest import SENTENCES, SpeechFactory, require_tiny_en_folder, wer
from tests.daemon_harness import DaemonUnderTest
from whisperd.config_load import parse_config
from whisperd.errors import ConfigError
from whisperd.jobs import Job, JobState
from whisperd.media import decode as media
from whisperd.models import locate as models

DaemonFactory = Callable[..., DaemonUnderTest]
Reference = Callable[..., tuple[list[Any], Any]]

FASTER = {"engine": "faster-whisper"}
# tiny.en scores about 0.1-0.35 on espeak-ng voices; far above that is a bug.
WER_BOUND = 0.5


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    """reference(audio_file, **kwargs) -> (segments, info) of faster-whisper's
    own WhisperModel.transcribe on the bundled tiny.en, int8 on one CPU thread
    like the daemon's worker here (cpu_threads = 1).

    The samples are decoded by ffmpeg as the daemon decodes them: faster-whisper's
    own decoder (PyAV) resamples differently (by up to 1e-4), which may change a token."""
    from faster_whisper import WhisperModel

    model = WhisperModel(require_tiny_en_folder(), device="cpu", compute_type="int8", cpu_threads=1)

    def transcribe(audio_file: Path, **kwargs: Any) -> tuple[list[Any], Any]:
        segments, info = model.transcribe(media.decode_audio(str(audio_file)), **kwargs)
        return list(segments), info

    yield transcribe


def wait_done(daemon: DaemonUnderTest, rel_path: str, timeout: float = 240.0) -> Job:
    job = daemon.wait_for_state(rel_path, JobState.DONE, JobState.FAILED, timeout=timeout)
    assert job.state is JobState.DONE, f"{rel_path} ended {job.state.value}: {job.last_error}"
    return job


def outputs_by_format(job: Job) -> dict[str, Path]:
    return {Path(p).suffix.lstrip("."): Path(p) for p in job.outputs}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- transcripts


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_faster_whisper_inbox_gives_faster_whispers_own_transcript(
    tmp_path: Path, speech: SpeechFactory, reference: Reference
) -> None:
    # The models folder a user gets from `whisperd models import` of the bundled folder.
    daemon = DaemonUnderTest(
        tmp_path / "d",
        tmp_path / "models",
        inboxes=[
            DaemonUnderTest.default_inbox(tmp_path / "d", "greedy", **FASTER),
            DaemonUnderTest.default_inbox(
                tmp_path / "d",
                "beam",
                **FASTER,
                beam_size=5,
                word_timestamps=True,
                initial_prompt="Weather, trains and breakfast.",
            ),
        ],
    )
    imported = daemon.cli("models", "import", require_tiny_en_folder(), "--name", "tiny.en")
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "models" / "tiny.en.ct2" / "model.bin").is_file()
    try:
        daemon.start()
        clip = speech(SENTENCES[0], "weather")
        for inbox in ("greedy", "beam"):
            target = tmp_path / "d" / inbox / "inbox"
            (target / ".weather.wav.part").write_bytes(clip.read_bytes())
            os.rename(target / ".weather.wav.part", target / "weather.wav")
        jobs = {j.spec.inbox: j for j in (wait_done_in(daemon, inbox) for inbox in ("greedy", "beam"))}
    finally:
        daemon.close()

    base = {"vad_filter": False, "condition_on_previous_text": True, "language": None}
    temperatures = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    expected = {
        "greedy": reference(clip, beam_size=1, temperature=temperatures, **base),
        "beam": reference(
            clip,
            beam_size=5,
            temperature=temperatures,
            word_timestamps=True,
            initial_prompt="Weather, trains and breakfast.",
            **base,
        ),
    }
    for inbox, job in jobs.items():
        segments, info = expected[inbox]
        files = outputs_by_format(job)
        document = json.loads(read(files["json"]))
        # Exactly faster-whisper's text and segment times, in openai-whisper's json shape.
        got = [(s["id"], s["start"], s["end"], s["text"]) for s in document["segments"]]
        assert got == [(n, s.start, s.end, s.text) for n, s in enumerate(segments)], inbox
        assert document["text"] == "".join(s.text for s in segments)
        assert document["language"] == info.language == "en"
        assert [s["tokens"] for s in document["segments"]] == [list(s.tokens) for s in segments]
        for key in ("seek", "avg_logprob", "no_speech_prob", "compression_ratio", "temperature"):
            assert key in document["segments"][0], key
        if inbox == "beam":
            words = [(w["word"], w["start"], w["end"]) for s in document["segments"] for w in s["words"]]
            assert words == [(w.word, w.start, w.end) for s in segments for w in s.words or ()]
        else:
            assert "words" not in document["segments"][0]
        text = read(files["txt"])
        assert wer(SENTENCES[0], text) < WER_BOUND, text
        lines = text.splitlines()
        assert [s.content for s in srt.parse(read(files["srt"]))] == lines
        assert [c.text for c in webvtt.read(str(files["vtt"])).captions] == lines
        # The job record and the json say where and how it ran.
        assert job.device == "cpu"
        meta = document["whisperd"]
        assert meta["device"] == "cpu" and meta["engine"] == "faster-whisper"
        assert meta["options"]["engine"] == "faster-whisper"
    loads = [e for e in daemon.events("model.loaded") if e.get("engine") == "faster-whisper"]
    assert loads and loads[0]["model"] == "tiny.en@faster-whisper:int8"
    assert loads[0]["bytes"] > 10 * 2**20  # measured: the RSS the int8 weights took


def wait_done_in(daemon: DaemonUnderTest, inbox: str) -> Job:
    def done() -> bool:
        found = [j for j in daemon.jobs() if j.spec.inbox == inbox and not j.state.is_active]
        return bool(found)

    daemon.wait_for(done, timeout=240.0, what=f"the job of inbox {inbox}")
    job = next(j for j in daemon.jobs() if j.spec.inbox == inbox)
    assert job.state is JobState.DONE, f"{inbox}: {job.state.value}: {job.last_error}"
    return job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_running_faster_whisper_job_shows_progress_and_stops_between_segments_on_cancel(
    daemon_factory: DaemonFactory, long_clip: Path, speech: SpeechFactory
) -> None:
    # The models folder holds only tiny.en.pt: faster-whisper finds the bundled folder itself.
    # The grace is far longer than one segment takes, even on a loaded machine:
    # a worker that does stop between segments is never killed for being slow.
    daemon = daemon_factory(inbox={**FASTER, "beam_size": 5}, workers={"cancel_grace_seconds": 15.0})
    daemon.start()
    daemon.drop(long_clip)

    seen: list[float] = []

    def well_under_way() -> bool:
        job = daemon.job_for("long.wav")
        if job is None:
            return False  # not yet settled
        assert job.state.is_active, f"long.wav ended {job.state.value} ({job.last_error}) before the cancel"
        if job.state is JobState.RUNNING and job.progress > 0:
            seen.append(job.progress)
        return len(set(seen)) >= 2

    daemon.wait_for(well_under_way, timeout=180.0, what="long.wav progressing")
    assert seen == sorted(seen) and all(0 < p < 1 for p in seen), seen
    running = daemon.job_for("long.wav")
    assert running is not None and running.eta_seconds is not None and running.eta_seconds > 0
    started = daemon.events("worker.started")

    os.rename(daemon.inbox / "long.wav", daemon.cancel / "long.wav")

    job = daemon.wait_for_state("long.wav", JobState.CANCELLED, JobState.DONE, timeout=60.0)
    assert job.state is JobState.CANCELLED and job.progress < 1.0
    # The worker stopped the job itself between two segments: nothing was killed.
    # (job.cancelled comes after the store's state, once the cleanup is done.)
    daemon.wait_for(
        lambda: any(e.get("job_id") == job.id for e in daemon.events("job.cancelled")),
        timeout=30.0,
        what="job.cancelled",
    )
    assert not [p for p in os.listdir(daemon.output) if "long" in p]
    assert not daemon.events("worker.killed")
    assert daemon.events("worker.started") == started

    # The same worker, with the same model loaded, takes the next file.
    daemon.drop(speech(SENTENCES[1], "next"))
    after = wait_done(daemon, "next.wav")
    assert wer(SENTENCES[1], read(outputs_by_format(after)["txt"])) < WER_BOUND
    assert len([e for e in daemon.events("model.loaded") if e.get("engine") == "faster-whisper"]) == 1


# --------------------------------------------------------------------------- refusals


@pytest.mark.slow
def test_a_compute_type_the_cpu_cannot_run_is_refused_at_start_naming_the_key(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(inbox={**FASTER, "compute_type": "float16"})
    daemon.start(wait_ready=False)
    assert daemon.process is not None
    daemon.process.wait(timeout=120)
    assert daemon.stop() == 1
    failed = daemon.events("daemon.start_failed")
    assert failed, daemon.log_text()
    error = failed[0]["error"]
    assert "inbox[0].compute_type" in error and "float16" in error
    assert "int8" in error  # what the CPU does run
    assert not daemon.events("daemon.ready")


def _config(**inbox: Any) -> dict[str, Any]:
    base = {"name": "a", "path": "/srv/a/in", "output": "/srv/a/out", "cancel": "/srv/a/c"}
    return {"inbox": [{**base, "done": "/srv/a/d", "failed": "/srv/a/f", **inbox}]}


@pytest.mark.parametrize(
    ("inbox", "key", "reason"),
    [
        ({"hotwords": "whisperd"}, "hotwords", "openai-whisper has no hotwords"),
        ({"batch_size": 4}, "batch_size", "no batched pipeline"),
        ({"compute_type": "int8"}, "compute_type", "no compute types"),
        ({**FASTER, "batch_size": 4}, "vad", "must be true"),
        ({**FASTER, "batch_size": 4, "vad": True}, "condition_on_previous_text", "must be false"),
        (
            {**FASTER, "batch_size": 4, "vad": True, "condition_on_previous_text": False},
            "temperature",
            "one value",
        ),
        (
            {
                **FASTER,
                "batch_size": 4,
                "vad": True,
                "condition_on_previous_text": False,
                "temperature": [0.0],
                "word_timestamps": True,
                "hallucination_silence_threshold": 2.0,
            },
            "hallucination_silence_threshold",
            "no hallucination skipping",
        ),
    ],
)
def test_an_option_the_engine_does_not_have_is_refused_naming_the_key(
    inbox: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(_config(**inbox), source="config.toml")
    assert error.value.key == f"inbox[0].{key}"
    assert reason in error.value.reason


def test_options_the_engine_has_are_accepted() -> None:
    batched = {
        **FASTER,
        "batch_size": 8,
        "vad": True,
        "condition_on_previous_text": False,
        "temperature": [0.0],
        "hotwords": "whisperd",
        "compute_type": "int8",
    }
    options = parse_config(_config(**batched), source="config.toml").inboxes[0].decode_options()
    assert (options.engine, options.batch_size, options.hotwords) == ("faster-whisper", 8, "whisperd")
    default_engine = parse_config({"models": {"engine": "faster-whisper"}, **_config()}, source="c.toml")
    assert default_engine.inboxes[0].decode_options().engine == "faster-whisper"


# --------------------------------------------------------------------------- models


@pytest.mark.slow
def test_models_list_says_which_engines_each_model_serves(tmp_path: Path, models_dir: Path) -> None:
    daemon = DaemonUnderTest(tmp_path / "d", tmp_path / "models")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "only-pt.pt").write_bytes((models_dir / "tiny.en.pt").read_bytes())
    imported = daemon.cli("models", "import", require_tiny_en_folder(), "--name", "both")
    assert imported.returncode == 0, imported.stderr
    assert "openai-whisper, faster-whisper" in imported.stdout

    listing = daemon.cli("models", "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "openai-whisper,faster-whisper" in rows["both"]
    assert "openai-whisper" in rows["only-pt"] and "faster-whisper" not in rows["only-pt"]
    # The bundled tiny.en serves faster-whisper from its package, imported or not.
    assert "faster-whisper" in rows["tiny.en"] and "bundled" in rows["tiny.en"]
    found = {m.name: m.engines for m in models.list_models(str(tmp_path / "models"))}
    assert found == {"both": ("openai-whisper", "faster-whisper"), "only-pt": ("openai-whisper",)}
    kept = sorted(os.listdir(tmp_path / "models" / "both.ct2"))
    assert {"model.bin", "config.json", "tokenizer.json"} <= set(kept)


@pytest.mark.slow
def test_a_folder_without_its_tokenizer_serves_openai_whisper_only_and_doctor_says_so(
    tmp_path: Path,
) -> None:
    # Without tokenizer.json faster-whisper would fetch one from a hub: never here.
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in ("model.bin", "config.json"):
        os.link(Path(require_tiny_en_folder()) / item, partial / item)
    root = tmp_path / "d"
    daemon = DaemonUnderTest(
        root,
        tmp_path / "models",
        inboxes=[
            DaemonUnderTest.default_inbox(root, "fw", model="partial", **FASTER),
            DaemonUnderTest.default_inbox(root, "ow", model="partial"),
        ],
    )
    imported = daemon.cli("models", "import", str(partial), "--name", "partial")
    assert imported.returncode == 0, imported.stderr
    assert "engines: openai-whisper\n" in imported.stdout
    assert not (tmp_path / "models" / "partial.ct2").exists()
    assert models.ct2_model_folder(str(tmp_path / "models"), "partial") is None

    doctor = daemon.cli("doctor").stdout
    assert "[FAIL] model partial (faster-whisper): no CTranslate2 folder partial.ct2" in doctor
    assert "[ok  ] model partial: available" in doctor


# --------------------------------------------------------------------------- the model cache


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_budget_holds_both_engines_models_and_ctranslate2_keeps_to_cpu_threads(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    from tests.workers.test_gpu_pool import computing_threads, the_worker_pid, thread_cpu_ticks, transcribe

    root = tmp_path / "d"
    inboxes = [
        DaemonUnderTest.default_inbox(root, "ow", formats=["txt", "json"]),
        DaemonUnderTest.default_inbox(root, "fw", formats=["txt", "json"], **FASTER),
    ]
    # tiny.en takes about 145 MiB as openai-whisper fp32, about 75 MiB as CTranslate2 int8.
    daemon = DaemonUnderTest(
        root, models_dir, inboxes=inboxes, workers={"cpu_memory_budget_mb": 200, "cpu_threads": 1}
    )
    try:
        daemon.start()
        clip = speech(SENTENCES[2], "library")
        transcribe(daemon, "ow", clip, "first.wav")
        transcribe(daemon, "fw", clip, "second.wav")
        label = "tiny.en@faster-whisper:int8"
        events = [(e["event"], e.get("model"), e.get("reason")) for e in daemon.events()]
        unloaded = events.index(("model.unloaded", "tiny.en", "pressure"))
        assert unloaded < events.index(("model.loaded", label, None)), "evicted only after the load"
        measured = daemon.store.model_memory(label, "cpu")
        assert measured is not None and 20 * 2**20 < measured < 145 * 2**20, measured

        # cpu_threads = 1: CTranslate2 computes on one thread. Uncapped, its
        # pool splits the work about evenly over every core; the worker's own
        # Python thread (faster-whisper's mel features in numpy) may show up
        # too, with a smaller share (larger on a loaded machine), so the test
        # asks that one thread did at least twice what any other did.
        pid = the_worker_pid(daemon)
        before = thread_cpu_ticks(pid)
        third = transcribe(daemon, "fw", clip, "third.wav")
        busy = computing_threads(before, thread_cpu_ticks(pid))
        assert len(busy) == 1 or busy[0] >= 2 * busy[1], f"threads that computed (ticks): {busy}"
        assert wer(SENTENCES[2], read(outputs_by_format(third)["txt"])) < WER_BOUND
        assert [e["model"] for e in daemon.events("model.loaded")] == ["tiny.en", label]  # warm
    finally:
        daemon.close()
