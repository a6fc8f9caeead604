"""The job store unreachable for longer than the busy timeout: another real
process holds SQLite's write lock (a backup, an operator's sqlite3 shell) or
PostgreSQL's connections are terminated. whisperd rides it out and resumes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import POSTGRES_URL, SENTENCES, SpeechFactory
from tests.daemon.test_recovery import (
    DaemonFactory,
    assert_transcribed_once,
    jobs_for,
    wait_disposed,
)
from tests.daemon_harness import DaemonUnderTest
from whisperd.errors import StoreUnavailable
from whisperd.jobs import FileIdentity, JobSpec, JobState
from whisperd.store.job_store import JobStore
from whisperd.store.outage import RetryPolicy, StoreHealth, outage_reason

# A test-shortened busy timeout: the lock below is held far longer.
OUTAGE_DAEMON = {"database_busy_timeout_seconds": 0.3}

_LOCKER = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
    "c.execute('COMMIT')\n"
)


@contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    """Another process holds the database's write lock until the block ends."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert locker.stdout is not None and locker.stdin is not None
    assert locker.stdout.readline().strip() == "locked"
    try:
        yield
    finally:
        locker.stdin.close()
        assert locker.wait(60) == 0


def store_up(daemon: DaemonUnderTest) -> float:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("whisperd_store_up "))


def store_errors(daemon: DaemonUnderTest) -> float:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("whisperd_store_errors_total ")
    )


def daemon_events(daemon: DaemonUnderTest, name: str) -> list[dict[str, object]]:
    """Events the daemon process logged itself (workers log their own outage)."""
    pid = daemon.process.pid if daemon.process else None
    return [e for e in daemon.events(name) if e.get("pid") == pid]


def assert_alive(daemon: DaemonUnderTest) -> None:
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log_text()


def assert_status_still_reads(daemon: DaemonUnderTest) -> None:
    """`status` opens the store read-only: a held write lock (WAL) does not
    stop it from showing the queue, while the daemon cannot write."""
    status = daemon.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "main/running.wav" in status.stdout
    assert "Traceback" not in status.stderr


def test_running_job_and_dropped_file_survive_a_held_write_lock(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(daemon=OUTAGE_DAEMON)
    running = speech(SENTENCES[0], "running")
    dropped = speech(SENTENCES[1], "dropped")
    daemon.start()
    assert store_up(daemon) == 1
    daemon.store  # noqa: B018 - opened (schema checked) before the lock
    daemon.drop(running)
    daemon.wait_for_state("running.wav", JobState.RUNNING)

    with write_lock_held(daemon.state_dir / "jobs.db"):
        daemon.drop(dropped)
        daemon.wait_for(lambda: bool(daemon.events("store.unreachable")), what="the outage logged")
        daemon.wait_for(lambda: store_up(daemon) == 0, what="whisperd_store_up 0")
        # Held well past the busy timeout: several failed attempts, backing off.
        daemon.wait_for(lambda: store_errors(daemon) >= 4, what="retries")
        assert_status_still_reads(daemon)
        assert_alive(daemon)

    daemon.wait_for(lambda: store_up(daemon) == 1, what="whisperd_store_up back to 1")
    wait_disposed(daemon, "running.wav", JobState.DONE, JobState.FAILED)
    wait_disposed(daemon, "dropped.wav", JobState.DONE, JobState.FAILED)
    written: list[str] = []
    for name in ("running.wav", "dropped.wav"):
        jobs = jobs_for(daemon, name)
        assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, 1)], daemon.log_text()
        assert jobs[0].disposed_to == str(daemon.done / name)
        assert len(jobs[0].outputs) == 5 and all(Path(p).stat().st_size > 0 for p in jobs[0].outputs)
        written += [Path(p).name for p in jobs[0].outputs]
    assert sorted(written) == sorted(p.name for p in daemon.output.iterdir())
    # One outage in the daemon's log: logged when it began and when it ended.
    assert len(daemon_events(daemon, "store.unreachable")) == 1, daemon.log_text()
    assert len(daemon_events(daemon, "store.reachable")) == 1, daemon.log_text()
    assert daemon.events("store.reachable")[0]["outage_seconds"] >= 0
    assert daemon.cli("status").returncode == 0
    assert daemon.stop() == 0


def test_start_while_the_store_is_locked_waits_instead_of_exiting(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    daemon = daemon_factory(daemon=OUTAGE_DAEMON)
    daemon.store  # noqa: B018 - creates the database the lock is taken on
    with write_lock_held(daemon.state_dir / "jobs.db"):
        daemon.start(wait_ready=False)
        unreachable = daemon.wait_for_event("store.unreachable")
        assert "database is locked" in unreachable["reason"]
        assert_alive(daemon)
        assert daemon.events("daemon.ready") == []
    daemon.wait_for_event("daemon.ready")
    daemon.drop(speech(SENTENCES[2], "after"))
    wait_disposed(daemon, "after.wav", JobState.DONE, JobState.FAILED)
    assert_transcribed_once(daemon, "after.wav", attempts=1)
    assert daemon.stop() == 0


def test_stop_during_an_outage_exits_cleanly(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(daemon=OUTAGE_DAEMON)
    daemon.start()
    daemon.store  # noqa: B018
    with write_lock_held(daemon.state_dir / "jobs.db"):
        daemon.wait_for(lambda: bool(daemon.events("store.unreachable")), timeout=90, what="the outage")
        assert daemon.stop() == 0


# ------------------------------------------------------------------ unit level ---


def _spec(name: str) -> tuple[JobSpec, FileIdentity]:
    spec = JobSpec(inbox="main", inbox_root="/in", rel_path=name, model="tiny.en")
    return spec, FileIdentity(device=1, inode=hash(name) & 0xFFFF, size=10, mtime_ns=1)


def test_without_a_policy_a_locked_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path}/jobs.db", busy_timeout_seconds=0.1)
    try:
        with (
            write_lock_held(tmp_path / "jobs.db"),
            pytest.raises(StoreUnavailable, match="database is locked"),
        ):
            store.enqueue(*_spec("a.wav"), max_attempts=3)
        assert not store.health.up
        assert store.enqueue(*_spec("a.wav"), max_attempts=3)[1]
        assert store.health.up
    finally:
        store.close()


def test_reads_go_on_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """WAL lets readers read beside a writer: a read that needs a new pooled
    connection (the one it had is busy with a waiting write) must not wait
    for the write lock either (it did: setting up a connection asked for it)."""
    store = JobStore.open(f"sqlite:///{tmp_path}/jobs.db", busy_timeout_seconds=0.5)
    try:
        job, _ = store.enqueue(*_spec("a.wav"), max_attempts=3)
        with write_lock_held(tmp_path / "jobs.db"):

            def write() -> None:
                with contextlib.suppress(StoreUnavailable):  # the lock outlasts its busy timeout
                    store.fold_state_counts()

            waiting = threading.Thread(target=write, daemon=True)
            waiting.start()  # holds a connection while it waits for the lock
            for _ in range(5):
                with store.failing_fast():
                    assert [j.id for j in store.list_jobs()] == [job.id]
                    assert store.get(job.id) is not None
            waiting.join(30)
    finally:
        store.close()


def test_a_policy_waits_the_lock_out_and_the_write_lands(tmp_path: Path) -> None:
    waits: list[str] = []
    released = threading.Event()

    def on_wait(reason: str, _delay: float) -> None:
        waits.append(reason)
        if len(waits) == 3:
            released.set()

    stop = threading.Event()
    policy = RetryPolicy(stop=stop, first_delay_seconds=0.05, max_delay_seconds=0.2, on_wait=on_wait)
    store = JobStore.open(f"sqlite:///{tmp_path}/jobs.db", busy_timeout_seconds=0.1, retry=policy)
    try:
        result: list[bool] = []
        with write_lock_held(tmp_path / "jobs.db"):
            writer = threading.Thread(
                target=lambda: result.append(store.enqueue(*_spec("b.wav"), max_attempts=3)[1])
            )
            writer.start()
            assert released.wait(60)
        writer.join(60)
        assert result == [True]
        assert all("database is locked" in reason for reason in waits)
        assert store.health.up and store.health.errors >= 3
    finally:
        store.close()


def test_other_errors_are_not_outages() -> None:
    integrity = sa.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
    assert outage_reason(integrity) is None
    import sqlite3

    no_table = sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: jobs"))
    assert outage_reason(no_table) is None
    locked = sa.exc.OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))
    assert outage_reason(locked) == "database is locked"
    assert outage_reason(ValueError("x")) is None


def test_health_reports_each_outage_once() -> None:
    changes: list[bool] = []
    errors: list[int] = []
    health = StoreHealth("db")
    health.listen(on_change=changes.append, on_error=lambda: errors.append(1))
    for _ in range(3):
        health.failed("database is locked")
    health.succeeded()
    health.succeeded()
    health.failed("connection refused")
    assert changes == [False, True, False]
    assert len(errors) == 4
    assert health.reason == "connection refused" and not health.up


def test_postgres_store_reconnects_after_its_connections_are_terminated(postgres_schema_url: str) -> None:
    name = f"whisperd_outage_{uuid.uuid4().hex[:8]}"  # only this store's backends are terminated
    policy = RetryPolicy(stop=threading.Event(), first_delay_seconds=0.05, max_delay_seconds=0.5)
    store = JobStore.open(f"{postgres_schema_url}&application_name={name}", retry=policy)
    admin = sa.create_engine(POSTGRES_URL)
    try:
        store.enqueue(*_spec("first.wav"), max_attempts=3)
        for round_ in range(2):  # twice: reconnecting once is not luck
            with admin.begin() as conn:
                terminated = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :n"
                    ),
                    {"n": name},
                ).scalar()
            assert terminated and terminated >= 1
            job, created = store.enqueue(*_spec(f"after{round_}.wav"), max_attempts=3)
            assert created and job.state is JobState.QUEUED
        assert {j.spec.rel_path for j in store.list_jobs()} == {"first.wav", "after0.wav", "after1.wav"}
        assert store.health.up
    finally:
        admin.dispose()
        store.close()
