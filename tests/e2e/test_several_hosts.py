"""Two real daemons on one PostgreSQL database, as two hosts: a shared inbox
both watch, a private inbox each; every file done exactly once, no private
file touched by the other daemon; a second daemon with a name already live
is refused before it touches anything."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from tests.metrics.test_metrics_truth import scrape, value
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import TERMINAL_STATES, Job, JobState

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DaemonFactory = Callable[..., DaemonUnderTest]
FORMATS = ("txt", "srt", "vtt", "json", "tsv")
PHRASES = (
    "Good morning everyone, and welcome to the weekly meeting.",
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the final report before Friday afternoon.",
    "It is raining again in the city today.",
    "My sister plays the piano every evening after dinner.",
)


def host(
    factory: DaemonFactory, name: str, url: str, inboxes: list[dict[str, object]], **kwargs: object
) -> DaemonUnderTest:
    """A daemon with its own state folder and metrics port, on the shared database."""
    return factory(name, inboxes=inboxes, database_url=url, daemon={"instance": name}, **kwargs)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def drop_into(inbox: dict[str, object], clip: Path, name: str) -> None:
    """Copy under a temporary name, then rename, as a careful user does."""
    folder = Path(str(inbox["path"]))
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    temp.write_bytes(clip.read_bytes())
    temp.rename(folder / name)


def wait_for_exit(daemon: DaemonUnderTest, timeout: float = 120.0) -> int:
    """Wait for the daemon to exit on its own, its log read to the end."""
    assert daemon.process is not None
    code = daemon.process.wait(timeout)
    if daemon._reader is not None:
        daemon._reader.join(10)
    return code


def wait_all_disposed(daemon: DaemonUnderTest, count: int) -> list[Job]:
    def settled() -> bool:
        jobs = daemon.jobs()
        return len(jobs) >= count and all(j.state in TERMINAL_STATES and j.disposed_at for j in jobs)

    daemon.wait_for(settled, timeout=300.0, what=f"{count} jobs ended and their sources moved")
    return daemon.jobs()


def test_two_hosts_share_one_inbox_and_keep_their_private_ones(
    postgres_database_url: str, daemon_factory: DaemonFactory, speech: SpeechFactory, tmp_path: Path
) -> None:
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared")
    url = postgres_database_url
    a = host(daemon_factory, "hosta", url, [shared, DaemonUnderTest.default_inbox(tmp_path / "a", "a-only")])
    b = host(daemon_factory, "hostb", url, [shared, DaemonUnderTest.default_inbox(tmp_path / "b", "b-only")])
    a.start()
    b.start()
    private = {"a-only": a, "b-only": b}
    dropped: set[tuple[str, str]] = set()
    for n in range(4):
        drop_into(shared, speech(PHRASES[n], f"shared{n}"), f"shared{n}.wav")
        dropped.add(("shared", f"shared{n}.wav"))
    for inbox, daemon in private.items():
        for n in range(2):
            drop_into(daemon.inboxes[1], speech(PHRASES[n + 2], f"{inbox}-{n}"), f"{inbox}-{n}.wav")
            dropped.add((inbox, f"{inbox}-{n}.wav"))

    jobs = wait_all_disposed(a, len(dropped))
    # Exactly one job per file, each done at its first attempt.
    assert sorted((j.spec.inbox, j.spec.rel_path) for j in jobs) == sorted(dropped), a.log_text()
    not_done_once = [(j.spec.rel_path, j.state, j.attempts, j.last_error) for j in jobs]
    assert [row for row in not_done_once if row[1:3] != (JobState.DONE, 1)] == []
    for job in jobs:
        if job.spec.inbox in private:
            # A private file is run by its own host only, and the other never looks at it.
            owner = private[job.spec.inbox]
            other = b if owner is a else a
            assert job.worker is not None and job.worker.startswith(f"{owner.daemon_settings['instance']}/")
            assert all(e.get("job_id") != job.id for e in other.events()), other.log_text()
    # Outputs written once per file, sources moved once, nothing left behind.
    for table in [shared, a.inboxes[1], b.inboxes[1]]:
        names = sorted(name for (box, name) in dropped if box == table["name"])
        assert files_in(Path(table["done"])) == names
        assert files_in(Path(table["output"])) == sorted(
            f"{Path(name).stem}.{fmt}" for name in names for fmt in FORMATS
        )
        assert files_in(Path(table["path"])) == []
    assert [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name] == []
    assert a.events("job.failed") == [] and b.events("job.failed") == []
    # The registry lists both; each stops cleanly and leaves it.
    assert sorted(i.instance for i in a.store.instances()) == ["hosta", "hostb"]
    assert b.stop() == 0
    assert [i.instance for i in a.store.instances()] == ["hosta"]
    assert a.stop() == 0


def test_a_second_daemon_with_a_live_name_is_refused_and_leaves_the_first_ones_jobs_alone(
    postgres_database_url: str, daemon_factory: DaemonFactory, long_clip: Path
) -> None:
    first = host(daemon_factory, "twin", postgres_database_url, [])
    first.start()
    first.drop(long_clip)
    first.wait_for_event("job.claimed")
    running = first.wait_for_state("long.wav", JobState.RUNNING)

    # Another host (its own state folder) that was given the same name.
    second = host(daemon_factory, "twin2", postgres_database_url, [], metrics={"enabled": False})
    second.daemon_settings["instance"] = "twin"
    second.write_config()
    second.start(wait_ready=False)
    assert wait_for_exit(second) == 1, second.log_text()
    error = second.events("daemon.start_failed")[0]["error"]
    assert "instance 'twin' is already running" in error and "[daemon] instance" in error
    # The first daemon's job ran on, untouched: same claim, first attempt.
    job = first.job_for("long.wav")
    assert job is not None and job.state is JobState.RUNNING
    assert (job.claim_token, job.attempts) == (running.claim_token, 1)
    assert second.events("job.recovered") == []
    assert first.stop(signal.SIGTERM) == 0


def test_a_cancel_made_on_one_host_stops_the_job_running_on_another(
    postgres_database_url: str, daemon_factory: DaemonFactory, long_clip: Path, tmp_path: Path
) -> None:
    url = postgres_database_url
    a = host(daemon_factory, "hosta", url, [DaemonUnderTest.default_inbox(tmp_path / "a", "a-only")])
    b = host(daemon_factory, "hostb", url, [DaemonUnderTest.default_inbox(tmp_path / "b", "b-only")])
    a.start()
    b.start()
    b.drop(long_clip)
    b.wait_for_event("job.claimed")
    running = b.wait_for_state("long.wav", JobState.RUNNING)
    assert running.worker is not None and running.worker.startswith("hostb/")

    # `whisperd cancel` with host A's config: it only writes to the shared store.
    cancelled = a.cli("cancel", str(running.id))
    assert cancelled.returncode == 0, cancelled.stderr
    job = b.wait_for_state("long.wav", JobState.CANCELLED, timeout=60.0)
    b.wait_for(lambda: (b.job_for("long.wav") or job).disposed_at is not None, what="source moved")
    assert files_in(b.output) == []
    assert not (b.inbox / "long.wav").exists()
    assert all(e.get("job_id") != job.id for e in a.events()), a.log_text()
    # The store's notice reached host B (its poll stays the fallback).
    woken = [e for e in b.events("pool.woken") if e.get("kind") == "cancel"]
    assert [(e["reason"], e["job_id"]) for e in woken] == [("notify", job.id)], b.log_text()
    assert b.stop() == 0 and a.stop() == 0


def test_a_job_queued_by_a_busy_host_is_claimed_by_an_idle_one_woken_by_the_store(
    postgres_database_url: str,
    daemon_factory: DaemonFactory,
    long_clip: Path,
    speech: SpeechFactory,
    tmp_path: Path,
) -> None:
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared")
    url = postgres_database_url
    a = host(daemon_factory, "hosta", url, [shared, DaemonUnderTest.default_inbox(tmp_path / "a", "a-only")])
    # B settles files slowly: host A is the one that queues the shared file.
    b = host(daemon_factory, "hostb", url, [shared])
    b.daemon_settings["settle_seconds"] = 60.0
    b.write_config()
    a.start()
    b.start()
    # A's only worker is busy with its private file.
    drop_into(a.inboxes[1], long_clip, "long.wav")
    long_job = a.wait_for_state("long.wav", JobState.RUNNING)
    assert long_job.worker is not None and long_job.worker.startswith("hosta/")
    # Another private file waits behind it: A's work, which B can neither see nor claim.
    drop_into(a.inboxes[1], speech(PHRASES[2], "report"), "report.wav")
    a.wait_for_state("report.wav", JobState.QUEUED)
    a_text, b_text = scrape(a.metrics_port), scrape(b.metrics_port)
    # The store's queue is the same seen from either host.
    assert value(a_text, "whisperd_jobs", state="queued") == 1
    assert value(b_text, "whisperd_jobs", state="queued") == 1
    assert value(a_text, "whisperd_jobs_claimable") == 1
    assert value(b_text, "whisperd_jobs_claimable") == 0  # B is idle, not stuck

    drop_into(shared, speech(PHRASES[1], "fox"), "fox.wav")
    job = b.wait_for_state("fox.wav", JobState.DONE, timeout=120.0)
    assert job.worker is not None and job.worker.startswith("hostb/"), job.worker
    assert job.attempts == 1
    a_queued = [e for e in a.events("job.queued") if e.get("job_id") == job.id]
    assert len(a_queued) == 1, a.log_text()
    woken = [e for e in b.events("pool.woken") if e.get("kind") == "queued"]
    assert woken and all(e["reason"] == "notify" for e in woken), b.log_text()
    assert any("shared" in e["inboxes"] for e in woken)
    assert b.stop() == 0 and a.stop(signal.SIGTERM) == 0
