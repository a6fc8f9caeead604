"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from whisperd.daemon.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing where systemd's would, and its path."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_lifecycle_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="watching 2 inboxes")
    assert received(sock) == "READY=1\nSTATUS=watching 2 inboxes"
    notifier.status("3 queued, 1 running")
    assert received(sock) == "STATUS=3 queued, 1 running"
    notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    notifier.extend_timeout(90)
    assert received(sock) == "EXTEND_TIMEOUT_USEC=90000000"
    notifier.reloading(monotonic_usec=123)
    assert received(sock) == "RELOADING=1\nMONOTONIC_USEC=123"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.close()


def test_a_status_stays_on_one_line(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("failed:\nbad.mp3\nnot media")
    assert received(sock) == "STATUS=failed: bad.mp3 not media"


def test_an_abstract_socket_address_is_used_with_a_nul_byte() -> None:
    name = f"whisperd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == "READY=1"


def test_the_environment_is_read_by_default(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().watchdog()
    assert received(sock) == "WATCHDOG=1"


def test_without_systemd_every_call_is_a_quiet_no_op() -> None:
    notifier = Notifier({})
    with capture_logs() as events:
        results = [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping()]
    assert not notifier.enabled
    assert results == [False, False, False, False]
    assert events == []
    assert notifier.watchdog_interval() is None


def test_a_send_failure_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with capture_logs() as events:
        assert notifier.ready() is False
    assert [e["event"] for e in events] == ["sdnotify.send_failed"]
    assert "READY=1" in str(events[0]["message"])


def test_a_relative_socket_path_is_ignored_with_a_warning() -> None:
    with capture_logs() as events:
        notifier = Notifier({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled and not notifier.ready()
    assert events[0]["event"] == "sdnotify.unsupported_socket"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 60.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval() == expected
