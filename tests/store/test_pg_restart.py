"""PostgreSQL restarted under two daemons that share one database while they
run jobs (`pg_ctlcluster ... restart`: every connection is cut, the server
is away for a moment): both daemons stay up, say the store was unreachable
and is back, and every file still ends done exactly once."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SpeechFactory, missing_install
from tests.daemon_harness import DaemonUnderTest
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import TERMINAL_STATES, Job, JobState
from whisperd.store.job_store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DaemonFactory = Callable[..., DaemonUnderTest]
PHRASES = (
    "Good morning everyone, and welcome to the weekly meeting.",
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the final report before Friday afternoon.",
    "It is raining again in the city today.",
)
FORMATS = ("txt", "json")


def local_cluster() -> tuple[str, str]:
    """(version, name) of the PostgreSQL cluster on port 5432 (Debian's pg_lsclusters)."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        missing_install("pg_ctlcluster not installed (postgresql-common): cannot restart the server")
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True)
    for line in listed.stdout.splitlines():
        version, name, port, *_ = line.split()
        if port == "5432":
            return version, name
    missing_install("no PostgreSQL cluster of this machine listens on 5432: cannot restart it")


def restart_postgresql(version: str, name: str) -> None:
    subprocess.run(["pg_ctlcluster", version, name, "restart"], check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + 60
    while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL did not come back within a minute"
        time.sleep(0.2)


def drop_into(inbox: dict[str, object], clip: Path, name: str) -> None:
    folder = Path(str(inbox["path"]))
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    shutil.copyfile(clip, temp)
    temp.rename(folder / name)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.mark.timeout(600)
def test_postgresql_restarted_under_two_daemons_loses_and_repeats_nothing(
    postgres_database_url: str, daemon_factory: DaemonFactory, speech: SpeechFactory, tmp_path: Path
) -> None:
    version, cluster = local_cluster()
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared", formats=list(FORMATS))
    daemons = [
        daemon_factory(
            name,
            inboxes=[shared],
            database_url=postgres_database_url,
            daemon={"instance": name},
            workers={"heartbeat_seconds": 1.0},
        )
        for name in ("hosta", "hostb")
    ]
    for daemon in daemons:
        daemon.start()
    names = ["long-a.wav", "long-b.wav", *(f"s{n}.wav" for n in range(6))]
    longish = speech(" ".join(PHRASES * 2), "longish")
    for name in names[:2]:
        drop_into(shared, longish, name)
    for n, name in enumerate(names[2:]):
        drop_into(shared, speech(PHRASES[n % len(PHRASES)], Path(name).stem), name)
    watcher = daemons[0]

    def both_running() -> bool:
        return sum(j.state is JobState.RUNNING for j in observer.list_jobs(limit=100)) == 2

    observer = JobStore.open(postgres_database_url)
    try:
        watcher.wait_for(both_running, timeout=120.0, what="a job running on each daemon")
    finally:
        observer.close()
    restart_postgresql(version, cluster)
    observer = JobStore.open(postgres_database_url)

    def all_ended() -> bool:
        jobs = observer.list_jobs(limit=100)
        return len(jobs) == len(names) and all(j.state in TERMINAL_STATES and j.disposed_at for j in jobs)

    try:
        watcher.wait_for(all_ended, timeout=400.0, what="every file ended after the restart")
        jobs: list[Job] = observer.list_jobs(limit=100)
    finally:
        observer.close()
    assert sorted(j.spec.rel_path for j in jobs) == sorted(names)
    assert [
        (j.spec.rel_path, j.state.value, j.last_error) for j in jobs if j.state is not JobState.DONE
    ] == []
    assert files_in(Path(str(shared["done"]))) == sorted(names)
    expected = sorted(f"{Path(n).stem}.{fmt}" for n in names for fmt in FORMATS)
    assert files_in(Path(str(shared["output"]))) == expected
    assert files_in(Path(str(shared["path"]))) == [] and files_in(Path(str(shared["failed"]))) == []
    assert [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name] == []
    for daemon in daemons:
        # Up all along; its connection to the server was cut (the listener's,
        # always open, shows it) and made again.
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log_text()
        assert daemon.events("store.listen_failed"), daemon.log_text()
        assert len(daemon.events("store.listening")) >= 2, daemon.log_text()
        assert daemon.stop() == 0
