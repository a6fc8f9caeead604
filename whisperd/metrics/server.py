"""The /metrics HTTP endpoint: part of metrics.

`MetricsServer` serves a `Metrics` registry on a thread it owns, each
connection on a bounded thread of its own with a deadline (bounded_http),
so a slow or stuck client blocks neither scrapes nor stop().
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import make_wsgi_app

from whisperd.metrics.bounded_http import BoundedThreads
from whisperd.metrics.registry import Metrics

_log = structlog.stdlib.get_logger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("metrics.request", message=format % args)


class _Server(BoundedThreads, WSGIServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn(), a DNS query
        # that can stall start-up on a machine without a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called from inside an except block. The default prints a traceback
        # to stderr; a client that hung up or timed out is routine.
        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, OSError) else logging.WARNING
        _log.log(level, "metrics.request_failed", client=str(client_address), error=repr(error))


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves `metrics.registry` at http://host:port/metrics on a thread it owns.

    host: the address to listen on; loopback by default, so the metrics are
    not exposed beyond the machine unless configured. port: 0 picks a free
    port (see bound_port). Each connection has its own thread (a bounded
    number, see bounded_http) and client_timeout seconds in all, so a client
    that trickles bytes blocks neither scrapes nor stop().
    """

    # How often the serving loop looks at its stop event, in seconds.
    POLL_SECONDS = 0.25

    def __init__(
        self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9310, *, client_timeout: float = 10.0
    ) -> None:
        """client_timeout: seconds a connection may stay open in all (and
        wait for any one read), however slowly its client sends."""
        self._app = make_wsgi_app(metrics.registry)
        self._host = host
        self._port = port
        self._client_timeout = client_timeout
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server has not been started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and start serving; raises OSError naming the address if the
        port cannot be had."""
        if self._thread is not None:
            raise RuntimeError("the metrics server was already started")
        server_class = _Server6 if ":" in self._host else _Server
        try:
            server = make_server(
                self._host,
                self._port,
                self._app,
                server_class=server_class,
                handler_class=self._handler_class(),
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics: cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        assert isinstance(server, _Server)
        self._server = server
        self._server.timeout = self.POLL_SECONDS
        self._server.request_deadline = self._client_timeout
        self._thread = threading.Thread(target=self._serve, name="whisperd-metrics")
        self._thread.start()
        _log.info("metrics.listening", host=self._host, port=self.bound_port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait up to `timeout` seconds for the thread."""
        self._stopping.set()
        self.join(timeout)
        if self._thread is not None and self._thread.is_alive():
            _log.warning("metrics.stop_timeout", timeout=timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _handler_class(self) -> type[WSGIRequestHandler]:
        # StreamRequestHandler reads its socket timeout from the class.
        return type("_Handler", (_QuietHandler,), {"timeout": self._client_timeout})

    def _serve(self) -> None:
        server = self._server
        assert server is not None
        try:
            while not self._stopping.is_set():
                # Accepts one connection (its own thread serves it), or
                # returns after POLL_SECONDS idle.
                server.handle_request()
                server.expire_stuck()
        finally:
            server.close_clients(self.POLL_SECONDS * 4)
            server.server_close()
