"""Three daemons, each a host of its own (its own UTS namespace, so its own
hostname and instance name, state folder and metrics port), on one fresh
PostgreSQL database: one shared inbox and a private inbox each. While files
flow, the host running a shared job is SIGKILLed, a worker is SIGKILLed, and
a whole host (daemon and workers) is SIGSTOPped past its lease and resumed.
Every file must end done exactly once: one job, one set of outputs, its
source in done/, nothing failed, no temp file, no private file touched by
another host; the killed host's job is taken over by another host."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import SpeechFactory, missing_install
from tests.daemon_harness import DaemonUnderTest, WrappedDaemon
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import TERMINAL_STATES, Job, JobState
from whisperd.store.job_store import JobStore

T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

HOSTS = ("hosta", "hostb", "hostc")
# Short leases: a stopped or killed host's job is reclaimed within seconds.
LEASE_SECONDS = 6.0
FORMATS = ("txt", "json")
PHRASES = (
    "Good morning everyone, and welcome to the weekly meeting.",
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the final report before Friday afternoon.",
    "It is raining again in the city today.",
    "My sister plays the piano every evening after dinner.",
)
SHORT_FILES = 24


def in_own_uts_namespace(hostname: str) -> list[str]:
    """A wrapper that starts the daemon in a new UTS namespace named `hostname`."""
    return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", hostname]


def tree_of(pid: int) -> list[int]:
    """pid and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def signal_tree(pid: int, signum: int) -> None:
    for member in tree_of(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signum)


def drop_into(inbox: dict[str, object], clip: Path, name: str) -> None:
    folder = Path(str(inbox["path"]))
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    shutil.copyfile(clip, temp)
    temp.rename(folder / name)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hosts(
    postgres_database_url: str, models_dir: Path, tmp_path: Path
) -> Iterator[tuple[dict[str, object], dict[str, WrappedDaemon]]]:
    if shutil.which("unshare") is None:
        missing_install("unshare (util-linux) not installed: cannot give each daemon a host name of its own")
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared", formats=list(FORMATS))
    made: dict[str, WrappedDaemon] = {}
    for name in HOSTS:
        private = DaemonUnderTest.default_inbox(tmp_path / name, f"{name}-only", formats=list(FORMATS))
        made[name] = WrappedDaemon(
            tmp_path / name,
            models_dir,
            wrapper=in_own_uts_namespace(name),
            inboxes=[shared, private],
            database_url=postgres_database_url,
            workers={"lease_seconds": LEASE_SECONDS, "heartbeat_seconds": 1.0},
        )
    try:
        yield shared, made
    finally:
        for daemon in made.values():
            if daemon.process is not None and daemon.process.poll() is None:
                signal_tree(daemon.process.pid, signal.SIGCONT)
            daemon.close()


def wait_until(found: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll until `found()` gives something (a condition, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_for(store: JobStore, rel_path: str) -> Job | None:
    matches = [j for j in store.list_jobs(limit=100_000) if j.spec.rel_path == rel_path]
    return matches[0] if matches else None


def running(store: JobStore, rel_path: str) -> Callable[[], Job | None]:
    def check() -> Job | None:
        job = job_for(store, rel_path)
        return job if job is not None and job.state is JobState.RUNNING and job.worker else None

    return check


def instance_of(job: Job) -> str:
    assert job.worker is not None
    return job.worker.split("/", 1)[0]


def hosts_that_ran(store: JobStore, job_id: int) -> set[str]:
    return {a.worker.split("/", 1)[0] for a in store.attempts_of(job_id)}


def taken_over(store: JobStore, job_id: int, lost: str) -> Callable[[], bool]:
    """The job runs, or has run, on a host other than `lost`."""
    return lambda: bool(hosts_that_ran(store, job_id) - {lost})


@pytest.mark.timeout(900)
def test_three_hosts_under_kills_and_stops_transcribe_every_file_exactly_once(
    hosts: tuple[dict[str, object], dict[str, WrappedDaemon]], speech: SpeechFactory, tmp_path: Path
) -> None:
    shared, daemons = hosts
    for daemon in daemons.values():
        daemon.start()
    store = daemons["hosta"].store  # a reader of the shared database, whichever host is down
    # Each daemon took its namespace's hostname as its instance name.
    assert sorted(i.instance for i in store.instances()) == list(HOSTS)

    longish = speech(" ".join(PHRASES), "longish")
    dropped: set[tuple[str, str]] = set()

    def drop_target(name: str) -> None:
        # Dropped just before its step, so that it is still to be run then.
        drop_into(shared, longish, name)
        dropped.add(("shared", name))

    drop_target("kill-host.wav")
    for n in range(SHORT_FILES):
        drop_into(shared, speech(PHRASES[n % len(PHRASES)], f"s{n}"), f"s{n}.wav")
        dropped.add(("shared", f"s{n}.wav"))
    for host, daemon in daemons.items():
        for n in range(2):
            drop_into(daemon.inboxes[1], speech(PHRASES[n + 1], f"{host}-{n}"), f"{host}-{n}.wav")
            dropped.add((f"{host}-only", f"{host}-{n}.wav"))
    takeover = 10 * LEASE_SECONDS + 60

    # 1. The host running a shared job is SIGKILLed; another host takes the job over.
    victim = wait_until(running(store, "kill-host.wav"), timeout=120.0, what="kill-host.wav running")
    killed = instance_of(victim)
    daemons[killed].kill()
    wait_until(taken_over(store, victim.id, killed), timeout=takeover, what="kill-host.wav taken over")
    daemons[killed].start()

    # 2. A worker running a shared job is SIGKILLed: its pool replaces it, the job is retried.
    drop_target("kill-worker.wav")
    job = wait_until(running(store, "kill-worker.wav"), timeout=120.0, what="kill-worker.wav running")
    owner = daemons[instance_of(job)]
    os.kill(int(owner.events("worker.started")[-1]["pid"]), signal.SIGKILL)

    # 3. A whole host is frozen past its lease, then resumed: its job was taken over meanwhile.
    drop_target("stop-host.wav")
    frozen_job = wait_until(running(store, "stop-host.wav"), timeout=120.0, what="stop-host.wav running")
    frozen = instance_of(frozen_job)
    frozen_process = daemons[frozen].process
    assert frozen_process is not None
    signal_tree(frozen_process.pid, signal.SIGSTOP)
    try:
        wait_until(
            taken_over(store, frozen_job.id, frozen), timeout=takeover, what="stop-host.wav taken over"
        )
    finally:
        signal_tree(frozen_process.pid, signal.SIGCONT)

    def all_ended() -> list[Job]:
        jobs = store.list_jobs(limit=100_000)
        ended = len(jobs) >= len(dropped) and all(j.state in TERMINAL_STATES and j.disposed_at for j in jobs)
        return jobs if ended else []

    jobs = wait_until(all_ended, timeout=600.0, what=f"{len(dropped)} jobs ended and their sources moved")

    # One job per file, every one done.
    assert sorted((j.spec.inbox, j.spec.rel_path) for j in jobs) == sorted(dropped)
    assert [
        (j.spec.rel_path, j.state.value, j.last_error) for j in jobs if j.state is not JobState.DONE
    ] == []
    for job in jobs:
        if job.spec.inbox != "shared":
            # A private file is only ever run by the host that watches it.
            ran = hosts_that_ran(store, job.id)
            assert ran == {job.spec.inbox.removesuffix("-only")}, (job.spec.rel_path, ran)
    assert len(hosts_that_ran(store, victim.id)) >= 2

    # One set of outputs per file, each source in done/ once, nothing left anywhere.
    for table in [shared, *(d.inboxes[1] for d in daemons.values())]:
        names = sorted(name for (box, name) in dropped if box == table["name"])
        assert files_in(Path(str(table["done"]))) == names
        expected = sorted(f"{Path(name).stem}.{fmt}" for name in names for fmt in FORMATS)
        assert files_in(Path(str(table["output"]))) == expected
        assert files_in(Path(str(table["path"]))) == []
        assert files_in(Path(str(table["failed"]))) == []
    assert [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name] == []

    # Every host is still up (the frozen one resumed, the killed one restarted) and stops cleanly.
    for name, daemon in daemons.items():
        assert daemon.process is not None and daemon.process.poll() is None, f"{name} is down"
    for daemon in daemons.values():
        assert daemon.stop() == 0
