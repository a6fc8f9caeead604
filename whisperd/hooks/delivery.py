"""One try at a completion hook: run a program, or POST to a webhook.

A program runs without a shell, in a process group of its own, the job's
JSON on its stdin and its facts in WHISPERD_* environment variables; at its
timeout the whole group is killed. What it prints (stdout and stderr
together) is kept, the last OUTPUT_TAIL_BYTES of it, for the log.

A webhook is one POST with urllib; redirects are not followed (a 3xx is a
failed try), so the request only ever goes to the configured http(s) URL.
Each function returns None for a delivery, or the reason it failed.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

# How much of a hook program's output is kept for the log.
OUTPUT_TAIL_BYTES = 4096
# After the kill at the timeout: how long to wait for the group to be reaped.
KILL_WAIT_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class TryResult:
    """What one try did."""

    # None: delivered; otherwise why not (exit status, timeout, HTTP status...).
    error: str | None
    # The last bytes the program printed, decoded (webhook: the answer's first bytes).
    output: str = ""


class _Tail:
    """Reads a pipe to its end in a thread of its own, keeping the last bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._fd = pipe.fileno()
        self._kept = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="whisperd-hook-output")
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    return
                self._kept += chunk
                del self._kept[:-OUTPUT_TAIL_BYTES]

    def text(self, timeout: float) -> str:
        """What was kept, once the pipe ended or after `timeout` (a grandchild
        that left the process group may hold the pipe open: not waited for)."""
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join()
        return bytes(self._kept).decode("utf-8", "replace")


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write the job's JSON to the program's stdin; a program that does not read it is fine."""
    with contextlib.suppress(OSError, ValueError):
        pipe.write(data)
    with contextlib.suppress(OSError, ValueError):
        pipe.close()


def run_program(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    document: bytes,
    timeout: float,
    cancel: threading.Event,
) -> TryResult:
    """Run `argv` with `document` on stdin; `cancel` (the daemon stopping) kills it early."""
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: a kill takes its children too
            close_fds=True,
        )
    except OSError as exc:
        return TryResult(error=f"cannot run {argv[0]}: {exc.strerror or exc}")
    assert process.stdin is not None and process.stdout is not None
    tail = _Tail(process.stdout)
    feeder = threading.Thread(target=_feed, args=(process.stdin, document), name="whisperd-hook-stdin")
    feeder.start()
    error = _wait_or_kill(process, timeout, cancel)
    feeder.join(KILL_WAIT_SECONDS)
    output = tail.text(KILL_WAIT_SECONDS)
    process.stdout.close()
    return TryResult(error=error, output=output)


def _wait_or_kill(process: subprocess.Popen[bytes], timeout: float, cancel: threading.Event) -> str | None:
    waited = 0.0
    step = min(0.2, timeout)
    while waited < timeout and not cancel.is_set():
        try:
            code = process.wait(step)
        except subprocess.TimeoutExpired:
            waited += step
            continue
        return None if code == 0 else _exit_reason(code)
    _kill_group(process)
    if cancel.is_set():
        return "killed: whisperd is stopping"
    return f"timed out after {timeout:g} s; its process group was killed"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_WAIT_SECONDS)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None  # the 3xx then surfaces as an HTTPError: a failed try


_OPENER = urllib.request.build_opener(_NoRedirects)


def post_webhook(
    url: str, *, document: bytes, kind: str, timeout: float, cancel: threading.Event | None = None
) -> TryResult:
    """POST `document` to `url` within `timeout` seconds in all (urllib's own
    timeout is per socket operation: a receiver answering byte by byte would
    hold it far longer); any 2xx answer is a delivery. A try given up on
    goes on in its own daemon thread until its socket times out."""
    outcome: list[TryResult] = []
    attempt = threading.Thread(
        target=lambda: outcome.append(_post(url, document=document, kind=kind, timeout=timeout)),
        name="whisperd-webhook",
        daemon=True,
    )
    attempt.start()
    deadline = time.monotonic() + timeout
    while attempt.is_alive() and time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
        attempt.join(min(0.2, max(0.0, deadline - time.monotonic())))
    if outcome:
        return outcome[0]
    if cancel is not None and cancel.is_set():
        return TryResult(error="given up: whisperd is stopping")
    return TryResult(error=f"timed out after {timeout:g} s waiting for {url}")


def _post(url: str, *, document: bytes, kind: str, timeout: float) -> TryResult:
    # The scheme was checked at config load (http or https only); redirects are not followed.
    request = urllib.request.Request(  # noqa: S310
        url,
        data=document,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "whisperd", "X-Whisperd-Hook": kind},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            status = int(reply.status)
            answer = reply.read(OUTPUT_TAIL_BYTES).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return TryResult(error=f"HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return TryResult(error=f"cannot reach {url}: {reason}")
    if not 200 <= status < 300:
        return TryResult(error=f"HTTP {status}", output=answer)
    return TryResult(error=None, output=answer)
