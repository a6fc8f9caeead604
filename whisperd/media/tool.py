"""Running ffmpeg and ffprobe as bounded children: part of media.

`run_tool` collects a tool's stdout and the tail of its stderr without
threads, within a deadline and an output limit; the child is killed on any
error and dies with the thread that started it (parent-death signal), so no
ffmpeg is ever left behind. `ffmpeg_available` is doctor's check.

The parent-death signal is set by util-linux's `setpriv --pdeathsig` in the
child rather than by a Python `preexec_fn`: a preexec_fn makes subprocess
fork() the whole worker (a model of hundreds of MB to GBs, its page tables
copied and every page then copy-on-write under the engine's threads, ~15 ms
and a burst of page faults per file) where it can otherwise vfork. Without
a usable setpriv the preexec_fn is the fallback.
"""

from __future__ import annotations

import ctypes
import functools
import os
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from whisperd.errors import MediaError

# prctl(2) option: signal this process when its parent dies.
_PR_SET_PDEATHSIG = 1

# How much of a tool's stderr is kept for error messages; the end holds the
# error, and a broken file can make ffmpeg print megabytes of warnings.
STDERR_KEEP_BYTES = 4096

# Limit for `ffmpeg -version` in ffmpeg_available().
VERSION_TIMEOUT_SECONDS = 10.0

_READ_CHUNK_BYTES = 1 << 16
INSTALL_HINT = "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg), which also provides ffprobe"


@dataclass(frozen=True, kw_only=True)
class ToolRun:
    """A finished ffmpeg/ffprobe run."""

    returncode: int
    stdout: bytearray
    # The last STDERR_KEEP_BYTES of stderr, decoded.
    stderr_tail: str


def ffmpeg_available() -> tuple[bool, str]:
    """For `whisperd doctor`: (True, ffmpeg's version line) or (False, what to install)."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found on PATH; {INSTALL_HINT}"
    try:
        done = subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"ffmpeg does not run ({exc}); {INSTALL_HINT}"
    first_line = done.stdout.decode("utf-8", errors="replace").partition("\n")[0].strip()
    if done.returncode != 0 or not first_line:
        return False, f"ffmpeg -version failed (exit status {done.returncode}); {INSTALL_HINT}"
    return True, first_line


def run_tool(
    args: list[str],
    *,
    path: str,
    timeout: float | None,
    action: str,
    fd: int | None = None,
    max_stdout: int | None = None,
) -> ToolRun:
    """Run ffmpeg/ffprobe, collecting stdout and the tail of stderr.

    The process is killed if it outlives `timeout` or if anything goes wrong
    while reading from it, so no ffmpeg is ever left behind.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = _launch(args, fd)
    except FileNotFoundError as exc:
        raise MediaError(path, f"{args[0]} not found on PATH; {INSTALL_HINT}") from exc
    try:
        stdout, stderr = _collect_output(proc, deadline, max_stdout)
        returncode = proc.wait(timeout=_time_left(deadline))
    except subprocess.TimeoutExpired as exc:
        raise MediaError(path, f"timed out {action} after {format_number(timeout or 0.0)} s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return ToolRun(
        returncode=returncode,
        stdout=stdout,
        stderr_tail=bytes(stderr[-STDERR_KEEP_BYTES:]).decode("utf-8", errors="replace"),
    )


def _collect_output(
    proc: subprocess.Popen[bytes], deadline: float | None, max_stdout: int | None = None
) -> tuple[bytearray, bytearray]:
    """Read both pipes until EOF without threads; stderr is trimmed as it
    grows; stdout over max_stdout bytes raises OverLimit (the caller's
    finally kills the tool)."""
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    buffers = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = _time_left(deadline)
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0.0)
            for key, _ in selector.select(remaining):
                fd = int(key.fd)
                chunk = os.read(fd, _READ_CHUNK_BYTES)
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffers[fd] += chunk
                if max_stdout is not None and len(stdout) > max_stdout:
                    raise OverLimit
                if fd != proc.stdout.fileno() and len(stderr) > 2 * STDERR_KEEP_BYTES:
                    del stderr[:-STDERR_KEEP_BYTES]
    return stdout, stderr


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the pool's group kill still applies
        return None


# Looked up once here: the child between fork and exec should only call it.
_PRCTL = _load_prctl()


def _launch(args: list[str], fd: int | None) -> subprocess.Popen[bytes]:
    """Start the tool (FileNotFoundError if it is not on PATH), set to die
    with the calling thread."""
    tool = shutil.which(args[0])
    if tool is None:
        raise FileNotFoundError(args[0])
    common: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "pass_fds": () if fd is None else (fd,),
    }
    setpriv = _setpriv()
    if setpriv is not None:
        return subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", tool, *args[1:]], **common)
    # Only a prctl call, no locks taken: safe next to the worker's threads.
    return subprocess.Popen([tool, *args[1:]], preexec_fn=_die_with_caller, **common)  # noqa: PLW1509


@functools.cache
def _setpriv() -> str | None:
    """setpriv's path if it can set the parent-death signal (util-linux 2.33+),
    tried once per process; None: use the preexec_fn."""
    found = shutil.which("setpriv")
    if found is None:
        return None
    try:
        done = subprocess.run(
            [found, "--pdeathsig", "KILL", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 else None


def _die_with_caller() -> None:
    """In the child, before exec: Linux kills ffmpeg when the thread that
    started it dies (a worker the pool SIGKILLs included), so none is orphaned."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


class OverLimit(Exception):
    """A tool's output grew past the limit its caller set."""


def _time_left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def format_number(value: float) -> str:
    """12.34 -> "12.3", 100.0 -> "100", 0.0042 -> "0.0042": short but never a misleading 0."""
    if value >= 0.1:
        return f"{value:.1f}".removesuffix(".0")
    return f"{value:.2g}"
