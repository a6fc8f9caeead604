"""Source names near NAME_MAX (255 bytes) through the real daemon: every name
derived from them (outputs, done/ and failed/ names, error notes, temp files)
fits, the daemon stays up, and it restarts cleanly with them in its store."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES
from tests.daemon_harness import DaemonUnderTest
from whisperd.files.atomic import TMP_MARKER
from whisperd.files.names import NAME_MAX, name_bytes
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

# 255 bytes of ASCII, 254 bytes of CJK (3 bytes a character) and a mix.
ASCII_NAME = "m" * 251 + ".wav"
CJK_NAME = "x" + "会议录音" * 20 + "录音" + ".wav"
MIXED_NAME = "é" * 120 + "録" * 3 + ".wav"


def _drop(daemon: DaemonUnderTest, source: Path, name: str) -> None:
    """Copy under a short temporary name, then rename (a `.NAME.part` would not fit)."""
    temp = daemon.inbox / ".incoming.part"
    shutil.copyfile(source, temp)
    os.rename(temp, daemon.inbox / name)


def _ended(daemon: DaemonUnderTest, name: str, count: int) -> list[Job]:
    def done() -> bool:
        jobs = [j for j in daemon.jobs() if j.spec.rel_path == name]
        return len(jobs) == count and all(not j.state.is_active and j.disposed_at for j in jobs)

    daemon.wait_for(done, timeout=240, what=f"{count} ended job(s) for a {name_bytes(name)}-byte name")
    return sorted((j for j in daemon.jobs() if j.spec.rel_path == name), key=lambda j: j.id)


def _all_names_fit(root: Path) -> None:
    for _folder, dirs, files in os.walk(root):
        assert all(name_bytes(n) <= NAME_MAX for n in [*dirs, *files])


def test_long_names_succeed_twice_and_fail_with_a_note(
    daemon_factory: Callable[..., DaemonUnderTest], speech: Callable[..., Path]
) -> None:
    assert all(250 <= name_bytes(n) <= NAME_MAX for n in (ASCII_NAME, CJK_NAME, MIXED_NAME))
    daemon = daemon_factory()
    daemon.start()
    clip = speech(SENTENCES[0], "clip")
    junk = daemon.root / "junk.bin"
    junk.write_bytes(b"not audio at all\n" * 50)

    for name in (ASCII_NAME, CJK_NAME):
        for round_ in (1, 2):  # the same name again: a numbered name in done/ and in output/
            _drop(daemon, clip, name)
            jobs = _ended(daemon, name, round_)
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE], [j.last_error for j in jobs]
        moved = [Path(j.disposed_to or "") for j in jobs]
        assert moved[0] == daemon.done / name and moved[1] != moved[0]
        assert all(p.is_file() and p.suffix == ".wav" and p.parent == daemon.done for p in moved)
        # (Whether a re-dropped name keeps the first transcript is another issue's;
        # here: the latest outputs are all there, under names that fit.)
        outs = [Path(p) for p in jobs[-1].outputs]
        assert len(outs) == 5 and all(p.is_file() and p.parent == daemon.output for p in outs)
        assert "weather" in next(p for p in outs if p.suffix == ".txt").read_text(encoding="utf-8").lower()
        assert not (daemon.inbox / name).exists()

    _drop(daemon, junk, MIXED_NAME)
    [failed] = _ended(daemon, MIXED_NAME, 1)
    assert failed.state is JobState.FAILED and "not a media file" in (failed.last_error or "")
    assert (daemon.failed / MIXED_NAME).is_file()
    [note] = [p for p in daemon.failed.iterdir() if p.name.endswith(".wav.error.txt")]
    assert "not a media file" in note.read_text(encoding="utf-8")

    assert daemon.process is not None and daemon.process.poll() is None
    assert "job.handling_failed" not in daemon.log_text()
    _all_names_fit(daemon.root)
    assert not list(daemon.root.rglob(f"*{TMP_MARKER}"))

    # A restart with these jobs in the store comes up (READY) and changes nothing.
    before = sorted(str(p) for p in daemon.root.rglob("*") if "state" not in p.parts)
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_for_event("daemon.ready")
    assert sorted(str(p) for p in daemon.root.rglob("*") if "state" not in p.parts) == before
    assert daemon.process is not None and daemon.process.poll() is None


def _corrupt_for_sweep(db: Path, job_id: int) -> None:
    """Make job_id's source move owed again, with a path no system call accepts
    (a NUL byte: the stat inside the move raises ValueError, not OSError)."""
    with sqlite3.connect(db) as conn:
        (spec_json,) = conn.execute("SELECT spec_json FROM jobs WHERE id = ?", (job_id,)).fetchone()
        spec = json.loads(spec_json)
        spec["inbox_root"] += "\x00"
        conn.execute(
            "UPDATE jobs SET spec_json = ?, disposed_at = NULL, disposed_to = NULL WHERE id = ?",
            (json.dumps(spec), job_id),
        )


def test_a_job_whose_recovery_raises_is_logged_and_skipped(
    daemon_factory: Callable[..., DaemonUnderTest], speech: Callable[..., Path]
) -> None:
    """Start-up recovery and the sweep meet a job they cannot handle: it is
    logged with its id and counted, READY is still sent, other jobs still run."""
    daemon = daemon_factory()
    daemon.start()
    _drop(daemon, speech(SENTENCES[1], "one"), "one.wav")
    [first] = _ended(daemon, "one.wav", 1)
    assert daemon.stop() == 0
    _corrupt_for_sweep(daemon.state_dir / "jobs.db", first.id)

    daemon.start()  # waits for READY
    failure = daemon.wait_for_event("job.handling_failed", stage="dispose", job_id=first.id)
    assert "null byte" in failure["error"]
    # The daemon logs the failure, then counts it: the scrape waits for the count.
    texts: list[str] = []

    def counted() -> bool:
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            texts[:] = [response.read().decode()]
        pattern = r'^whisperd_job_handling_errors_total\{stage="dispose"\} [1-9]'
        return bool(re.search(pattern, texts[0], re.M))

    daemon.wait_for(counted, timeout=60, what="whisperd_job_handling_errors_total{stage=dispose} counted")

    _drop(daemon, speech(SENTENCES[2], "two"), "two.wav")
    [second] = _ended(daemon, "two.wav", 1)
    assert second.state is JobState.DONE and (daemon.done / "two.wav").is_file()
    # The periodic sweep meets the same job again and the daemon still runs.
    daemon.wait_for(
        lambda: len([e for e in daemon.events("job.handling_failed") if e.get("job_id") == first.id]) >= 2,
        timeout=120,
        what="the sweep to retry the job",
    )
    assert daemon.process is not None and daemon.process.poll() is None
    assert (daemon.done / "one.wav").is_file()
