"""A source that cannot leave its inbox, through the real daemon: done/ not
writable by the daemon's user, and a read-only inbox (a read-only bind mount
in a private mount namespace). The job is transcribed once, its source is
recorded as stuck with the reason (store, status, log once, metric), the
sweep stops retrying it, and a restart does not transcribe it again.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonUnderTest, WrappedDaemon
from tests.e2e.test_hostile import _can_mount_privately, _without_root_file_access
from whisperd.jobs import Job, JobState

pytestmark = pytest.mark.slow

SpeechFactory = Callable[..., Path]
TEXT = "Please close the window before you leave the house."


def _stuck_gauge(daemon: DaemonUnderTest) -> float | None:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^whisperd_sources_stuck (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _jobs_of(daemon: DaemonUnderTest, name: str) -> list[Job]:
    return [job for job in daemon.jobs() if job.spec.rel_path == name]


def _stuck_events(daemon: DaemonUnderTest, name: str) -> list[dict[str, object]]:
    return [e for e in daemon.events("source.stuck") if e.get("file") == name]


def _assert_stuck_once(daemon: DaemonUnderTest, source: Path, reason: str) -> Job:
    """Transcribed once, stuck once with `reason`, several sweeps later."""
    name = source.name
    daemon.wait_for(lambda: bool(_stuck_events(daemon, name)), timeout=180, what=f"{name} stuck")
    # Three more housekeeping sweeps, each of which would have retried the move.
    daemon.wait_for_rescans(3)
    events = _stuck_events(daemon, name)
    assert len(events) == 1, events
    assert reason in str(events[0]["reason"])
    assert not daemon.events("source.move_retry"), "a permanent error is not retried"
    jobs = _jobs_of(daemon, name)
    assert [job.state for job in jobs] == [JobState.DONE]
    assert events[0]["job_id"] == jobs[0].id
    assert jobs[0].disposed_at is None
    assert source.exists(), "the source stays in the inbox"
    assert "window" in (daemon.output / f"{source.stem}.txt").read_text(encoding="utf-8").lower()
    assert all((daemon.output / f"{source.stem}.{ext}").is_file() for ext in ("srt", "vtt", "json", "tsv"))
    status = daemon.cli("status")
    assert status.returncode == 0, status.stderr
    lines = [line for line in status.stdout.splitlines() if f"#{jobs[0].id}" in line]
    assert len(lines) == 1 and "stuck" in lines[0] and name in lines[0] and reason in lines[0], status.stdout
    assert _stuck_gauge(daemon) == 1
    return jobs[0]


def _assert_not_transcribed_after_restart(daemon: DaemonUnderTest, source: Path, job: Job) -> None:
    transcript = daemon.output / f"{source.stem}.txt"
    written = transcript.stat().st_mtime_ns
    assert daemon.stop() == 0
    daemon.start()
    # Start-up retried the move once (the folder may have been fixed): still stuck.
    assert len(_stuck_events(daemon, source.name)) == 1
    daemon.wait_for_rescans(2)
    assert [(j.id, j.state) for j in _jobs_of(daemon, source.name)] == [(job.id, JobState.DONE)]
    assert not [e for e in daemon.events("job.queued") if e.get("file") == source.name]
    assert transcript.stat().st_mtime_ns == written
    assert source.exists()
    assert _stuck_gauge(daemon) == 1
    assert daemon.process is not None and daemon.process.poll() is None


def test_done_folder_not_writable_leaves_the_source_stuck_once(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    wrapper = _without_root_file_access()
    if wrapper is None:
        pytest.skip("running as root without setpriv: root writes into any folder")
    inbox = DaemonUnderTest.default_inbox(tmp_path)
    done = Path(inbox["done"])
    done.mkdir(parents=True)
    done.chmod(0o555)
    daemon = WrappedDaemon(tmp_path, models_dir, wrapper=wrapper, inboxes=[inbox])
    try:
        daemon.start()
        source = daemon.drop(speech(TEXT, "locked"))
        job = _assert_stuck_once(daemon, source, "permission denied")
        _assert_not_transcribed_after_restart(daemon, source, job)
        assert list(done.iterdir()) == []
    finally:
        daemon.close()
        done.chmod(0o755)


def test_read_only_inbox_leaves_the_source_stuck_once(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory
) -> None:
    if not _can_mount_privately():
        pytest.skip("needs root and `unshare --mount` to make the inbox a read-only bind mount")
    inbox = DaemonUnderTest.default_inbox(tmp_path)
    folder = Path(inbox["path"])
    folder.mkdir(parents=True)
    # The daemon sees the inbox read-only; the test (outside its namespace) can still drop files.
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, str(folder)]
    daemon = WrappedDaemon(tmp_path, models_dir, wrapper=wrapper, inboxes=[inbox])
    try:
        daemon.start()
        source = daemon.drop(speech(TEXT, "pinned"))
        job = _assert_stuck_once(daemon, source, "read-only file system")
        _assert_not_transcribed_after_restart(daemon, source, job)
        assert not daemon.done.exists() or list(daemon.done.iterdir()) == []
    finally:
        daemon.close()


def test_a_transient_obstacle_in_done_is_retried_and_status_shows_the_waiting_source(
    tmp_path: Path, models_dir: Path, speech: SpeechFactory, daemon_database_url: str | None
) -> None:
    """done/sub is a plain file (root ignores permissions, so the obstacle is
    a name collision): the move fails, is retried with backoff, status says
    why the source waits; once the file is gone the source reaches done/."""
    daemon = DaemonUnderTest(tmp_path, models_dir, database_url=daemon_database_url)
    try:
        daemon.start()
        daemon.done.mkdir(parents=True, exist_ok=True)
        obstacle = daemon.done / "sub"
        obstacle.write_text("in the way\n", encoding="utf-8")
        source = daemon.drop(speech(TEXT, "blocked"), sub="sub")
        daemon.wait_for_event("source.move_retry", timeout=180, file="sub/blocked.wav")
        [job] = _jobs_of(daemon, "sub/blocked.wav")
        assert job.state is JobState.DONE and job.disposed_at is None
        assert source.exists()
        status = daemon.cli("status")
        assert status.returncode == 0, status.stderr
        [line] = [line for line in status.stdout.splitlines() if f"#{job.id}" in line]
        assert "move retried" in line and "sub/blocked.wav" in line and "Not a directory" in line, line
        assert not _stuck_events(daemon, "sub/blocked.wav"), "a transient error is not stuck at once"

        obstacle.unlink()
        arrived = daemon.done / "sub" / "blocked.wav"
        # The sweep moves the file, then records the move in the store.
        daemon.wait_for(
            lambda: (daemon.store.get(job.id) or job).disposed_at is not None,
            timeout=120,
            what="the source's move recorded",
        )
        assert arrived.is_file()
        assert not source.exists()
        assert f"#{job.id}" not in daemon.cli("status").stdout
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.close()
