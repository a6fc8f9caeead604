"""systemd's readiness and watchdog protocol, sd_notify(3), without libsystemd.

systemd passes the path of a datagram socket in $NOTIFY_SOCKET; the service
sends it newline-separated KEY=VALUE messages. Outside systemd (no
$NOTIFY_SOCKET) every method does nothing, so the daemon calls them
unconditionally. Sending never raises: a lost notification is logged, and
systemd's own timeouts are the safety net.

Children inherit $NOTIFY_SOCKET; with NotifyAccess=main systemd ignores their
messages, and the daemon may leave it out of the workers' environment.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

_log = structlog.stdlib.get_logger(__name__)

# systemd's socket addresses: a file-system path, or a Linux abstract address
# written with a leading "@" (sent with a leading NUL byte instead).
_ABSTRACT_PREFIX = "@"


class Notifier:
    """Sends sd_notify messages to the socket named in the environment.

    `environ` defaults to os.environ, read once when the Notifier is made.
    Safe to share between threads.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (Type=notify units count as started now)."""
        return self._send("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self._send(*_status_line(text))

    def watchdog(self) -> bool:
        """Keep-alive ping; needed at least every watchdog_interval() seconds."""
        return self._send("WATCHDOG=1")

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """A configuration reload has started; call ready() when it is done.
        MONOTONIC_USEC lets systemd (Type=notify-reload) match the two up."""
        usec = _monotonic_usec() if monotonic_usec is None else monotonic_usec
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self._send("STOPPING=1", *_status_line(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start, stop or reload timeout
        fires (e.g. while a model loads or running jobs drain)."""
        return self._send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 0)}")

    def watchdog_interval(self) -> float | None:
        """systemd's watchdog timeout in seconds (WatchdogSec=), or None when
        the watchdog is off or meant for another process. Ping at about half
        of it so one late ping is not fatal."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            _log.warning("sdnotify.bad_watchdog_usec", value=self._watchdog_usec)
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, *lines: str) -> bool:
        """Send one datagram; True when it went out, False when there is no
        socket or sending failed (logged, never raised)."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(message, self._address)
            except OSError as exc:
                _log.warning("sdnotify.send_failed", message=message.decode(), error=str(exc))
                return False
        return True


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith(_ABSTRACT_PREFIX):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock: addresses (systemd 254+, for VMs) are not needed on a host.
    _log.warning("sdnotify.unsupported_socket", notify_socket=value)
    return None


def _status_line(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One message is lines of KEY=VALUE: a newline would end the status early.
    return ("STATUS=" + " ".join(text.splitlines()),)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
