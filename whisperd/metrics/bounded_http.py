"""A socketserver mixin: a bounded number of handler threads, each with a
deadline.

One local client that connects and trickles a byte now and then (slowloris)
must not block scrapes or shutdown: every connection gets its own thread, at
most `max_handlers` at once (more are refused at once), and a connection still
open after `request_deadline` seconds is shut down, whatever it sends. The
server's own loop calls expire_stuck(); close_clients() ends them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any


class BoundedThreads:
    """Mix in before a socketserver.TCPServer subclass."""

    # Handler threads at most; a connection beyond them is closed unanswered.
    max_handlers = 8
    # Seconds a connection may stay open in all, however slowly it sends.
    request_deadline = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_handlers)
        self._clients_lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._handlers: set[threading.Thread] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # type: ignore[attr-defined]  # TCPServer's
            return
        thread = threading.Thread(
            target=self._handle, args=(request, client_address), name="whisperd-metrics-client"
        )
        with self._clients_lock:
            self._deadlines[request] = time.monotonic() + self.request_deadline
            self._handlers.add(thread)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - one client's failure is logged, never raised
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            with self._clients_lock:
                self._deadlines.pop(request, None)
                self._handlers.discard(threading.current_thread())
            self.shutdown_request(request)  # type: ignore[attr-defined]
            self._slots.release()

    def expire_stuck(self, now: float | None = None) -> int:
        """Shut down connections past their deadline (their handler's read
        then returns and the thread ends); returns how many."""
        moment = time.monotonic() if now is None else now
        with self._clients_lock:
            stuck = [sock for sock, deadline in self._deadlines.items() if deadline <= moment]
        for sock in stuck:
            _shut(sock)
        return len(stuck)

    def close_clients(self, timeout: float) -> None:
        """Shut down every open connection and wait up to `timeout` seconds
        for their handler threads."""
        with self._clients_lock:
            sockets, threads = list(self._deadlines), list(self._handlers)
        for sock in sockets:
            _shut(sock)
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its handler
        sock.shutdown(socket.SHUT_RDWR)
