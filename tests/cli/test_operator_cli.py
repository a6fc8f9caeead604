"""The operator's commands through the real daemon and the real CLI:
`show` and `--json` on real jobs, `retry` from failed/ and cancel/ (the same
job, a new attempt), `pause`/`resume` across a daemon restart, and retention
pruning old finished jobs while the daemon runs."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import SpeechFactory, wer
from tests.daemon_harness import DaemonUnderTest
from whisperd.cli.operator import NOT_FOUND_EXIT, SOURCE_UNAVAILABLE_EXIT, WRONG_STATE_EXIT
from whisperd.jobs import AttemptEnd, AttemptOutcome, FileIdentity, Job, JobSpec, JobState

pytestmark = pytest.mark.slow

DaemonFactory = Callable[..., DaemonUnderTest]
QUIET = {"log_level": "info"}
TEXT = "The quick brown fox jumps over the lazy dog."
# A transcript of clean synthetic speech is this close to the spoken text (tiny.en).
WER_BOUND = 0.5


def cli_json(daemon: DaemonUnderTest, *args: str) -> Any:
    result = daemon.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_disposed(daemon: DaemonUnderTest, rel_path: str, state: JobState) -> Job:
    def disposed() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and job.state is state and job.disposed_at is not None

    daemon.wait_for(disposed, timeout=240.0, what=f"{rel_path} {state.value} and its source moved")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def metric(daemon: DaemonUnderTest, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_failed_file_fixed_and_retried_ends_done_as_the_same_job(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(daemon=QUIET)
    daemon.start()
    fake = daemon.root / "talk.wav"
    fake.write_text("a shopping list, not a recording\n", encoding="utf-8")
    daemon.drop(fake)
    failed = wait_disposed(daemon, "talk.wav", JobState.FAILED)

    shown = cli_json(daemon, "show", str(failed.id))
    assert shown["job"]["state"] == "failed"
    assert (shown["job"]["source_where"], shown["job"]["source_now"]) == (
        "failed",
        str(daemon.failed / "talk.wav"),
    )
    assert len(shown["history"]) == failed.attempts
    last = shown["history"][-1]
    assert last["outcome"] == "failed" and "not a media file" in last["error"]
    assert last["worker"] and last["device"] == "cpu" and last["seconds"] is not None

    # The operator fixes the cause (the real recording) where the file failed, and retries.
    shutil.copyfile(speech(TEXT, "talk"), daemon.failed / "talk.wav")
    retried = daemon.cli("retry", str(failed.id))
    assert retried.returncode == 0, retried.stderr
    assert "queued again" in retried.stdout
    assert not (daemon.failed / "talk.wav.error.txt").exists()

    done = wait_disposed(daemon, "talk.wav", JobState.DONE)
    assert done.id == failed.id
    assert [job.id for job in daemon.jobs()] == [failed.id]
    assert (daemon.done / "talk.wav").is_file()
    assert wer(TEXT, (daemon.output / "talk.txt").read_text(encoding="utf-8")) < WER_BOUND

    shown = cli_json(daemon, "show", str(done.id))
    outcomes = [a["outcome"] for a in shown["history"]]
    assert outcomes[-2:] == ["failed", "done"] and len(outcomes) == done.attempts
    assert [a["attempt"] for a in shown["history"]] == list(range(1, done.attempts + 1))
    assert shown["job"]["source_where"] == "done"
    assert str(daemon.output / "talk.txt") in shown["job"]["outputs"]
    text = daemon.cli("show", str(done.id))
    assert text.returncode == 0 and "attempt" in text.stdout and "done" in text.stdout

    listed = cli_json(daemon, "jobs")["jobs"]
    assert [(j["id"], j["state"], j["file"]) for j in listed] == [(done.id, "done", "talk.wav")]
    assert listed[0]["took_seconds"] is not None and listed[0]["audio_seconds"] > 0
    status = cli_json(daemon, "status")
    assert status["counts"]["done"] == 1 and status["running"] == [] and status["paused_inboxes"] == []

    # Errors a script can tell apart.
    assert daemon.cli("retry", str(done.id)).returncode == WRONG_STATE_EXIT
    assert daemon.cli("retry", "99999").returncode == NOT_FOUND_EXIT
    assert daemon.cli("show", "99999").returncode == NOT_FOUND_EXIT
    lost = daemon.root / "lost.wav"
    lost.write_text("not audio either\n", encoding="utf-8")
    daemon.drop(lost)
    gone = wait_disposed(daemon, "lost.wav", JobState.FAILED)
    (daemon.failed / "lost.wav").unlink()
    refused = daemon.cli("retry", str(gone.id))
    assert refused.returncode == SOURCE_UNAVAILABLE_EXIT
    assert "gone" in refused.stderr and str(gone.id) in refused.stderr


def test_pause_holds_across_a_restart_and_a_cancelled_job_retries(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(daemon=QUIET)
    daemon.start()
    assert daemon.cli("pause", "nope").returncode == NOT_FOUND_EXIT
    paused = daemon.cli("pause")
    assert paused.returncode == 0 and "inbox main paused" in paused.stdout
    daemon.drop(speech(TEXT, "held"))
    job = daemon.wait_for_state("held.wav", JobState.QUEUED)
    daemon.wait_for(lambda: metric(daemon, "whisperd_inbox_paused", inbox="main") == 1, what="paused gauge")

    daemon.stop()
    daemon.start()
    daemon.wait_for_rescans(2)  # a worker polls for claims far more often than this
    held = daemon.store.get(job.id)
    assert held is not None and held.state is JobState.QUEUED and held.attempts == 0
    status = cli_json(daemon, "status")
    assert status["paused_inboxes"] == ["main"]
    assert [j["id"] for j in status["queued"]] == [job.id]
    assert "paused  inbox main" in daemon.cli("status").stdout

    # Cancelled while it waits: its file goes to cancel/; retry brings it back.
    assert daemon.cli("cancel", str(job.id)).returncode == 0
    daemon.wait_for(
        lambda: cli_json(daemon, "show", str(job.id))["job"]["source_where"] == "cancel",
        what="the cancelled file moved to cancel/",
    )
    assert (daemon.cancel / "held.wav").is_file()
    retried = daemon.cli("retry", str(job.id))
    assert retried.returncode == 0, retried.stderr
    assert (daemon.inbox / "held.wav").is_file() and not (daemon.cancel / "held.wav").exists()
    daemon.wait_for_rescans(1)
    assert daemon.store.get(job.id).state is JobState.QUEUED  # type: ignore[union-attr]  # still paused

    resumed = daemon.cli("resume", "main")
    assert resumed.returncode == 0 and "inbox main resumed" in resumed.stdout
    done = wait_disposed(daemon, "held.wav", JobState.DONE)
    assert done.id == job.id and [j.id for j in daemon.jobs()] == [job.id]
    history = cli_json(daemon, "show", str(job.id))["history"]
    assert [a["outcome"] for a in history] == ["done"]
    daemon.wait_for(
        lambda: metric(daemon, "whisperd_inbox_paused", inbox="main") == 0, what="gauge back to 0"
    )


def test_the_daemon_prunes_old_finished_jobs_and_keeps_the_rest(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(daemon={**QUIET, "keep_finished_days": 1.0})
    store = daemon.store
    long_ago = time.time() - 10 * 86400

    def finished(name: str, at: float, inbox: str = "main") -> int:
        spec = JobSpec(inbox=inbox, inbox_root=str(daemon.inbox), rel_path=name, model="tiny.en")
        identity = FileIdentity(device=1, inode=abs(hash(name)) % 10**9, size=10, mtime_ns=1)
        job, _ = store.enqueue(spec, identity, max_attempts=1, now=at)
        claim = store.claim(worker="earlier/1/cpu0", device="cpu", lease_seconds=60, inboxes=[inbox], now=at)
        assert claim is not None and claim.job.id == job.id
        assert store.end_attempt(job.id, claim.token, AttemptEnd(outcome=AttemptOutcome.DONE), now=at + 1)
        assert store.mark_disposed(job.id, "", now=at + 1)
        return job.id

    old = [finished(f"old{i}.wav", long_ago + i) for i in range(3)]
    recent = finished("recent.wav", time.time() - 60)
    # Queued long ago and never run (its inbox paused, so no worker takes it).
    store.pause_inbox("elsewhere")
    other = daemon.root / "elsewhere"
    spec = JobSpec(
        inbox="elsewhere",
        inbox_root=str(other / "inbox"),
        rel_path="w.wav",
        model="tiny.en",
        output_dir=str(other / "output"),
        cancel_dir=str(other / "cancel"),
        done_dir=str(other / "done"),
        failed_dir=str(other / "failed"),
    )
    waiting, _ = store.enqueue(
        spec, FileIdentity(device=1, inode=7, size=1, mtime_ns=1), max_attempts=1, now=long_ago
    )

    daemon.start()
    pruned = daemon.wait_for_event("store.pruned")
    assert pruned["jobs"] == len(old)
    left = {j.id: j.state for j in daemon.jobs()}
    assert left == {recent: JobState.DONE, waiting.id: JobState.QUEUED}
    assert [j["id"] for j in cli_json(daemon, "jobs")["jobs"]] == [waiting.id, recent]
