"""A name dropped again after its job ended keeps every transcript.

Phones and meeting tools reuse `Recording.m4a`: each drop is a new job, done/
keeps each source (`Recording (2).m4a` ...), and each transcript is kept
under the same name as its source in done/, in subfolders too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SpeechFactory, wer
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import Job, JobState

# Three different sentences, one per drop of the same name.
SPOKEN = (
    "Good morning everyone, and welcome to the weekly meeting.",
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the final report before Friday afternoon.",
)
WER_BOUND = 0.5


def _ended_jobs(daemon: DaemonUnderTest, rel_path: str) -> list[Job]:
    return [j for j in daemon.jobs() if j.spec.rel_path == rel_path and not j.state.is_active]


def _finished(daemon: DaemonUnderTest, rel_path: str, count: int) -> Callable[[], bool]:
    """True once `count` jobs of rel_path ended, their sources were moved (the
    store records the move just after the rename) and the inbox no longer holds it."""

    def finished() -> bool:
        ended = _ended_jobs(daemon, rel_path)
        moved = len(ended) == count and all(j.disposed_at is not None for j in ended)
        return moved and not (daemon.inbox / rel_path).exists()

    return finished


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_same_name_dropped_three_times_keeps_three_transcripts_named_like_done(
    daemon_factory: Callable[..., DaemonUnderTest], speech: SpeechFactory
) -> None:
    daemon = daemon_factory("repeat", daemon={"log_level": "info"}, inbox={"formats": ["txt", "json"]})
    daemon.start()
    names = ("Recording.wav", "sub/Recording.wav")
    sources: list[Path] = []
    for round_no, text in enumerate(SPOKEN, start=1):
        source = speech(text, f"take{round_no}")
        sources.append(source)
        for rel_path in names:
            folder, _, name = rel_path.rpartition("/")
            daemon.drop(source, name, sub=folder)
        for rel_path in names:
            daemon.wait_for(
                _finished(daemon, rel_path, round_no),
                timeout=180,
                what=f"drop {round_no} of {rel_path} done and moved",
            )

    for rel_path in names:
        jobs = sorted(_ended_jobs(daemon, rel_path), key=lambda j: j.id)
        assert [j.state for j in jobs] == [JobState.DONE] * 3, [j.last_error for j in jobs]
        folder = rel_path.rpartition("/")[0]
        stems = ["Recording", "Recording (2)", "Recording (3)"]
        for job, stem, text, source in zip(jobs, stems, SPOKEN, sources, strict=True):
            prefix = f"{folder}/{stem}" if folder else stem
            txt = daemon.output / f"{prefix}.txt"
            assert job.outputs and str(txt) in job.outputs, job.outputs
            heard = txt.read_text(encoding="utf-8")
            assert wer(text, heard) < WER_BOUND, f"{txt}: {heard!r} is not {text!r}"
            meta = json.loads((daemon.output / f"{prefix}.json").read_text(encoding="utf-8"))
            assert meta["whisperd"]["job_id"] == job.id
            moved = daemon.done / f"{prefix}.wav"
            assert job.disposed_to == str(moved)
            assert moved.read_bytes() == source.read_bytes()
