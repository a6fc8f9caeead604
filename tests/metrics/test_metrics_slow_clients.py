"""A local client that trickles bytes to the metrics port (slowloris) blocks
neither Prometheus' scrapes nor the daemon's stop."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable

from tests.daemon_harness import DaemonUnderTest


class Trickler:
    """A real client: connects, sends one byte of a request, then one more
    every 0.2 s until told to stop or the server closes the connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(b"G")
        self.closed_by_server = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.sock.sendall(b"E")
                self.sock.setblocking(False)
                try:
                    if self.sock.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                finally:
                    self.sock.setblocking(True)
            except OSError:
                self.closed_by_server.set()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode()


def test_a_trickling_client_blocks_neither_scrapes_nor_stop(
    daemon_factory: Callable[..., DaemonUnderTest],
) -> None:
    daemon = daemon_factory("slowloris", daemon={"log_level": "info"})
    daemon.start()
    port = daemon.metrics_port
    slow = Trickler(port)
    try:
        assert "whisperd_jobs" in _scrape(port)  # served while the slow client holds its connection
        assert "whisperd_jobs" in _scrape(port)
        daemon.wait_for(slow.closed_by_server.is_set, timeout=60, what="the server to drop the slow client")
    finally:
        slow.close()

    stuck = Trickler(port)
    try:
        assert daemon.stop() == 0
        assert daemon.events("metrics.stop_timeout") == []  # stop did not wait on the stuck client
        # The daemon has exited by now (daemon.wait_for would stop at that):
        # the client itself sees its connection closed.
        assert stuck.closed_by_server.wait(30), "the stuck client was not closed at stop"
    finally:
        stuck.close()
