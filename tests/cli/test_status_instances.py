"""`whisperd status` lists the daemons sharing the job store: one daemon on
SQLite, two hosts on one PostgreSQL database (one of them killed, so its
row goes stale), read by the real CLI in a subprocess."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import DaemonUnderTest

pytestmark = pytest.mark.slow

DaemonFactory = Callable[..., DaemonUnderTest]


def status_json(daemon: DaemonUnderTest) -> dict[str, Any]:
    done = daemon.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def instances_of(daemon: DaemonUnderTest) -> dict[str, dict[str, Any]]:
    return {i["instance"]: i for i in status_json(daemon)["instances"]}


def test_status_lists_the_one_daemon_on_sqlite_and_forgets_it_once_stopped(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory("solo", daemon={"instance": "solo"})
    daemon.start()
    assert daemon.process is not None

    listed = instances_of(daemon)
    assert list(listed) == ["solo"]
    solo = listed["solo"]
    assert (solo["pid"], solo["inboxes"], solo["devices"], solo["live"]) == (
        daemon.process.pid,
        ["main"],
        ["cpu"],
        True,
    )
    assert solo["heartbeat_age_seconds"] < daemon.worker_settings["lease_seconds"]
    text = daemon.cli("status")
    assert text.returncode == 0, text.stderr
    assert "instances: 1 (1 live)" in text.stdout
    line = next(line for line in text.stdout.splitlines() if line.strip().startswith("solo "))
    assert f"pid {daemon.process.pid}" in line and "inboxes main" in line and line.endswith("live")

    assert daemon.stop() == 0
    assert status_json(daemon)["instances"] == []


@pytest.mark.postgres
def test_status_lists_both_hosts_and_marks_a_killed_one_stale(
    postgres_database_url: str, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    shared = DaemonUnderTest.default_inbox(tmp_path / "nfs", "shared")
    url = postgres_database_url
    # A short lease on A, the default (15 s) on B: each row is judged by its own.
    a = daemon_factory(
        "hosta",
        inboxes=[shared, DaemonUnderTest.default_inbox(tmp_path / "a", "a-only")],
        database_url=url,
        daemon={"instance": "hosta"},
        workers={"lease_seconds": 3.0},
    )
    b = daemon_factory(
        "hostb",
        inboxes=[shared, DaemonUnderTest.default_inbox(tmp_path / "b", "b-only")],
        database_url=url,
        daemon={"instance": "hostb"},
    )
    a.start()
    b.start()
    assert a.process is not None and b.process is not None

    listed = instances_of(a)
    assert sorted(listed) == ["hosta", "hostb"]
    assert (listed["hosta"]["pid"], listed["hosta"]["inboxes"]) == (a.process.pid, ["a-only", "shared"])
    assert (listed["hostb"]["pid"], listed["hostb"]["inboxes"]) == (b.process.pid, ["b-only", "shared"])

    # Each row is judged by its own daemon's lease: B (15 s, beating every 5 s)
    # is live in every reading of A's status although A runs with a 3-s lease.
    assert (listed["hosta"]["lease_seconds"], listed["hostb"]["lease_seconds"]) == (3.0, 15.0)
    for _ in range(3):
        shown = instances_of(a)
        assert shown["hosta"]["live"] and shown["hostb"]["live"], shown
    # Host B's own view (its config, its lease) is the same list.
    assert sorted(instances_of(b)) == ["hosta", "hostb"]

    # Killed: no unregister, so its row stays until its heartbeat is too old.
    b.kill()
    a.wait_for(lambda: not instances_of(a)["hostb"]["live"], timeout=60.0, what="hostb stale in status")
    listed = instances_of(a)
    assert listed["hosta"]["live"]
    assert listed["hostb"]["heartbeat_age_seconds"] >= 15.0
    text = a.cli("status")
    assert "instances: 2 (1 live)" in text.stdout, text.stdout
    assert any(
        line.strip().startswith("hostb ") and line.endswith("STALE") for line in text.stdout.splitlines()
    )
    assert a.stop(signal.SIGTERM) == 0
