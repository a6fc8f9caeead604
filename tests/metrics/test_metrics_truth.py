"""What the metrics say about refused files and cancels, read from a real
scrape of a real daemon: a file an inbox rule refuses is `rejected` (with its
reason), not a failed job; a cancel made with `whisperd cancel` (another
process) is counted by the daemon when it sees it in the store."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import JobState

DaemonFactory = Callable[..., DaemonUnderTest]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def value(text: str, name: str, **labels: str) -> float | None:
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and set(labels.items()) <= set(s.labels.items())
    ]
    assert len(found) <= 1, f"{name} {labels} matches {len(found)} samples"
    return found[0] if found else None


def drop_into(folder: Path, source: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    shutil.copyfile(source, temp)
    os.rename(temp, folder / name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_refused_files_and_cli_cancels_are_counted_as_what_they_are(
    daemon_factory: DaemonFactory, speech: SpeechFactory, long_clip: Path, tmp_path: Path
) -> None:
    root = tmp_path / "truth"
    inboxes = [
        DaemonUnderTest.default_inbox(root, "main"),
        DaemonUnderTest.default_inbox(root, "tiny", max_size_mb=0.001),  # 1000 bytes
    ]
    daemon = daemon_factory("truth", inboxes=inboxes)
    daemon.start()

    # Cancels made by another process: one running job, one queued behind it.
    daemon.drop(long_clip, "long.wav")
    running = daemon.wait_for_state("long.wav", JobState.RUNNING, timeout=60)
    daemon.drop(speech(SENTENCES[1], "waiting"))
    waiting = daemon.wait_for_state("waiting.wav", JobState.QUEUED, timeout=60)
    assert daemon.cli("cancel", str(waiting.id)).returncode == 0
    assert daemon.cli("cancel", str(running.id)).returncode == 0
    daemon.wait_for_state("long.wav", JobState.CANCELLED, timeout=60)

    # Files an inbox rule refuses: too large for "tiny", not media in "main".
    drop_into(Path(inboxes[1]["path"]), speech(SENTENCES[2], "big"), "big.wav")
    text_file = tmp_path / "notes.mp3"
    text_file.write_text("meeting notes, not a recording\n" * 20)
    daemon.drop(text_file)
    # Not a media extension at all: reported once, left where it is.
    document = tmp_path / "report.docx"
    document.write_bytes(b"PK\x03\x04 not audio")
    daemon.drop(document)
    for name in ("big.wav", "notes.mp3"):
        job = daemon.wait_for_state(name, JobState.FAILED, timeout=60)
        assert job.last_error  # the reason is still in the store and in failed/

    texts: list[str] = []

    def counted() -> bool:
        # The queued cancel is seen by the daemon's sweep of ended jobs (10 s).
        texts[:] = [scrape(daemon.metrics_port)]
        return (
            value(texts[0], "whisperd_jobs_finished_total", inbox="main", outcome="rejected") == 1
            and value(texts[0], "whisperd_jobs_finished_total", inbox="tiny", outcome="rejected") == 1
            and value(texts[0], "whisperd_job_cancels_total", inbox="main", phase="queued") == 1
            and value(texts[0], "whisperd_job_cancels_total", inbox="main", phase="running") is not None
            # The store says cancelled before the job's end reaches the daemon's metrics.
            and value(texts[0], "whisperd_jobs_finished_total", inbox="main", outcome="cancelled") is not None
        )

    daemon.wait_for(counted, timeout=60.0, what="rejections and cancels in a scrape")
    text = texts[0]
    assert value(text, "whisperd_jobs_rejected_total", inbox="tiny", reason="too_large") == 1
    assert value(text, "whisperd_jobs_rejected_total", inbox="main", reason="not_media") == 1
    # Neither refused file is a failed job (the failure-rate alert ignores them).
    assert value(text, "whisperd_jobs_finished_total", outcome="failed") is None
    assert value(text, "whisperd_job_cancels_total", inbox="main", phase="running") == 1
    assert value(text, "whisperd_jobs_finished_total", inbox="main", outcome="cancelled") == 1
    # The configured rescan period, so the stale-rescan alert knows it is on.
    assert value(text, "whisperd_rescan_interval_seconds") == 2.0

    daemon.wait_for(lambda: bool(daemon.events("job.rejected")), timeout=30.0, what="report.docx reported")
    (event,) = daemon.events("job.rejected")
    assert event["file"] == "report.docx" and event["reason"] == "unsupported extension .docx"
    daemon.wait_for(
        lambda: (
            value(scrape(daemon.metrics_port), "whisperd_jobs_rejected_total", reason="unsupported_extension")
            == 1
        ),
        timeout=30.0,
        what="the unsupported file counted",
    )
    status = daemon.cli("status")
    assert "ignored main/report.docx: unsupported extension .docx" in status.stdout, status
    assert (daemon.inbox / "report.docx").is_file()  # not moved: it was never whisperd's
    assert daemon.stop() == 0
    # Every job event of that run names its job, inbox and file (inside the inbox).
    job_events = [e for e in daemon.events() if str(e.get("event", "")).startswith("job.")]
    assert {e["event"] for e in job_events} >= {"job.queued", "job.claimed", "job.cancelled", "job.rejected"}
    for event in job_events:
        assert {"job_id", "inbox", "file"} <= set(event), event
        assert not str(event["file"]).startswith("/"), event

    # A restart (its rescan sees the file again) does not report it again.
    daemon.start()
    daemon.wait_for(
        lambda: value(scrape(daemon.metrics_port), "whisperd_last_rescan_timestamp_seconds") != 0,
        timeout=30.0,
        what="a rescan after the restart",
    )
    assert daemon.events("job.rejected") == []
    assert (daemon.inbox / "report.docx").is_file()
    assert daemon.stop() == 0
