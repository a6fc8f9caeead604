"""Everything whisperd asks of ffmpeg and ffprobe (layer L2).

This is the only module that runs them. Source files come from inbox folders
anyone may write to, so every call is built to read exactly one local file:

- an argument list, never a shell;
- the input is ``file:`` + the absolute path, so a name such as ``-y.wav``,
  ``concat:a.wav|b.wav`` or ``http:x.wav`` is never read as an option or a
  protocol;
- ``-protocol_whitelist file`` so nothing is fetched from a network;
- ``-format_whitelist`` (see ALLOWED_DEMUXERS) so a playlist or a list of
  files (hls, concat, image2, imf...) renamed ``.mp3`` cannot make ffmpeg
  open other files on this machine.

Errors are raised as errors.MediaError(path, reason) with a reason a user
can act on.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from whisperd.errors import MediaError

# Sample rate whisper models expect; decode_audio resamples to it.
SAMPLE_RATE = 16000

# Demuxers ffmpeg may use on a source file: audio and video containers and raw
# audio streams. Every other demuxer is refused, and on purpose: hls, dash,
# concat, imf and image2 open further files named inside the input, so
# without this list a text file renamed .mp3 could make ffmpeg read (and
# whisperd transcribe) any file the daemon can read. A format missing here
# fails with "not a media file ffmpeg can read: ... (<name>) ...".
ALLOWED_DEMUXERS: tuple[str, ...] = (
    "aac",
    "ac3",
    "aiff",
    "amr",
    "amrnb",
    "amrwb",
    "ape",
    "asf",
    "au",
    "avi",
    "caf",
    "dsf",
    "dts",
    "dtshd",
    "dv",
    "eac3",
    "flac",
    "flv",
    "loas",
    "matroska",
    "mlp",
    "mov",
    "mp3",
    "mpc",
    "mpc8",
    "mpeg",
    "mpegts",
    "mxf",
    "nistsphere",
    "nut",
    "ogg",
    "oma",
    "qcp",
    "rm",
    "shn",
    "sox",
    "tak",
    "truehd",
    "tta",
    "voc",
    "w64",
    "wav",
    "wtv",
    "wv",
    "xwma",
)

# How much of a tool's stderr is kept for error messages; the end holds the
# error, and a broken file can make ffmpeg print megabytes of warnings.
STDERR_KEEP_BYTES = 4096

# Default limit for ffprobe; reading headers takes well under a second.
PROBE_TIMEOUT_SECONDS = 60.0

# Limit for `ffmpeg -version` in ffmpeg_available().
VERSION_TIMEOUT_SECONDS = 10.0

_READ_CHUNK_BYTES = 1 << 16
_BYTES_PER_MB = 1_000_000
_INSTALL_HINT = "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg), which also provides ffprobe"
# "[mp3 @ 0x55d0c0ffee00] " in front of ffmpeg's log lines says nothing to a user.
_LOG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*")
_NOT_WHITELISTED = re.compile(r"\[(\w+) @ 0x[0-9a-f]+\] Format not on whitelist")


@dataclass(frozen=True, kw_only=True)
class MediaInfo:
    """What ffprobe says about a source file."""

    # Length in seconds from the container, else the longest stream; 0.0 when
    # ffprobe cannot tell (some raw streams), so limits cannot be checked.
    duration_seconds: float
    # Whether the file holds at least one decodable audio stream (one with a
    # sample rate: junk named .mp3 can show an "mp3" stream with rate 0).
    has_audio: bool
    # ffprobe's format_name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "wav".
    format_name: str
    # Codec of the first audio stream (e.g. "mp3", "aac", "opus"), if any.
    audio_codec: str | None


@dataclass(frozen=True, kw_only=True)
class _ToolRun:
    """A finished ffmpeg/ffprobe run."""

    returncode: int
    stdout: bytearray
    # The last STDERR_KEEP_BYTES of stderr, decoded.
    stderr_tail: str


def probe(path: str, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> MediaInfo:
    """Read the container and stream headers of `path` with ffprobe.

    Raises MediaError when ffprobe cannot read the file or times out.
    """
    args = [
        "ffprobe",
        "-v",
        "error",
        "-hide_banner",
        *_input_args(path),
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
    ]
    run = _run_tool(args, path=path, timeout=timeout, action="reading media info")
    if run.returncode != 0:
        raise MediaError(path, _failure_reason(path, run.stderr_tail))
    try:
        report = json.loads(run.stdout.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        reason = f"not a media file ffmpeg can read: ffprobe gave no usable report ({exc})"
        raise MediaError(path, reason) from exc
    return _media_info_from_report(report)


def decode_audio(path: str, *, timeout: float | None = None) -> npt.NDArray[np.float32]:
    """Decode `path`'s audio to mono float32 at SAMPLE_RATE (ffmpeg picks
    the stream, as whisper.load_audio does: the one with the most channels).

    The same conversion as whisper.load_audio (s16le from ffmpeg, / 32768),
    streamed from ffmpeg's stdout without temporary files. A truncated file
    yields the part ffmpeg could decode; a file that yields no samples at all
    is an error. `timeout` (seconds, None for no limit) bounds the whole run.
    """
    _stat_source(path)
    args = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        *_input_args(path),
        # Audio only: no video, subtitle or data streams are decoded.
        "-vn",
        "-sn",
        "-dn",
        "-f",
        "s16le",
        "-acodec",
        "pcm_s16le",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "pipe:1",
    ]
    run = _run_tool(args, path=path, timeout=timeout, action="decoding")
    if run.returncode != 0:
        raise MediaError(path, _failure_reason(path, run.stderr_tail))
    samples = np.frombuffer(run.stdout, dtype="<i2", count=len(run.stdout) // 2)
    if samples.size == 0:
        detail = _last_line(path, run.stderr_tail)
        raise MediaError(path, "no audio could be decoded" + (f": {detail}" if detail else ""))
    audio = samples.astype(np.float32)
    audio /= 32768.0
    return audio


def check_source(path: str, *, max_size_bytes: int = 0, max_duration_seconds: float = 0.0) -> MediaInfo:
    """Every check a source passes before it is queued, cheapest first.

    `max_size_bytes` and `max_duration_seconds` are the inbox limits (0: none).
    Returns what ffprobe found; raises MediaError with the first reason the
    file cannot be used.
    """
    st = _stat_source(path)
    if max_size_bytes > 0 and st.st_size > max_size_bytes:
        raise MediaError(
            path,
            f"file is {_format_number(st.st_size / _BYTES_PER_MB)} MB, over the inbox limit of "
            f"{_format_number(max_size_bytes / _BYTES_PER_MB)} MB",
        )
    _check_readable(path)
    info = probe(path)
    if not info.has_audio:
        raise MediaError(path, f"no audio stream (ffprobe found: {info.format_name})")
    if max_duration_seconds > 0 and info.duration_seconds > max_duration_seconds:
        raise MediaError(
            path,
            f"audio is {_format_number(info.duration_seconds)} s long, over the inbox limit of "
            f"{_format_number(max_duration_seconds)} s",
        )
    return info


def ffmpeg_available() -> tuple[bool, str]:
    """For `whisperd doctor`: (True, ffmpeg's version line) or (False, what to install)."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found on PATH; {_INSTALL_HINT}"
    try:
        done = subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"ffmpeg does not run ({exc}); {_INSTALL_HINT}"
    first_line = done.stdout.decode("utf-8", errors="replace").partition("\n")[0].strip()
    if done.returncode != 0 or not first_line:
        return False, f"ffmpeg -version failed (exit status {done.returncode}); {_INSTALL_HINT}"
    return True, first_line


def _input_args(path: str) -> list[str]:
    """Input options and the input itself; input options must precede -i."""
    return [
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        ",".join(ALLOWED_DEMUXERS),
        "-i",
        "file:" + os.path.abspath(path),
    ]


def _stat_source(path: str) -> os.stat_result:
    """stat() the source (following symlinks); refuse what is not a non-empty
    regular file (a FIFO or device would block ffmpeg)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise MediaError(path, "file vanished before it could be read") from exc
    except PermissionError as exc:
        raise MediaError(path, "cannot read file: permission denied") from exc
    except OSError as exc:
        raise MediaError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(path, "not a regular file")
    if st.st_size == 0:
        raise MediaError(path, "file is empty")
    return st


def _check_readable(path: str) -> None:
    """Open the file as ffmpeg will; O_NONBLOCK so a FIFO swapped in cannot hang us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise MediaError(path, "file vanished before it could be read") from exc
    except PermissionError as exc:
        raise MediaError(path, "cannot read file: permission denied") from exc
    except OSError as exc:
        raise MediaError(path, f"cannot read file: {exc.strerror or exc}") from exc
    os.close(fd)


def _run_tool(args: list[str], *, path: str, timeout: float | None, action: str) -> _ToolRun:
    """Run ffmpeg/ffprobe, collecting stdout and the tail of stderr.

    The process is killed if it outlives `timeout` or if anything goes wrong
    while reading from it, so no ffmpeg is ever left behind.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError as exc:
        raise MediaError(path, f"{args[0]} not found on PATH; {_INSTALL_HINT}") from exc
    try:
        stdout, stderr = _collect_output(proc, deadline)
        returncode = proc.wait(timeout=_remaining(deadline))
    except subprocess.TimeoutExpired as exc:
        raise MediaError(path, f"timed out {action} after {_format_number(timeout or 0.0)} s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return _ToolRun(
        returncode=returncode,
        stdout=stdout,
        stderr_tail=bytes(stderr[-STDERR_KEEP_BYTES:]).decode("utf-8", errors="replace"),
    )


def _collect_output(proc: subprocess.Popen[bytes], deadline: float | None) -> tuple[bytearray, bytearray]:
    """Read both pipes until EOF without threads; stderr is trimmed as it grows."""
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    buffers = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0.0)
            for key, _ in selector.select(remaining):
                fd = int(key.fd)
                chunk = os.read(fd, _READ_CHUNK_BYTES)
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffers[fd] += chunk
                if fd != proc.stdout.fileno() and len(stderr) > 2 * STDERR_KEEP_BYTES:
                    del stderr[:-STDERR_KEEP_BYTES]
    return stdout, stderr


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _failure_reason(path: str, stderr_tail: str) -> str:
    """Turn a failed run into the reason a user reads."""
    if not os.path.lexists(path):
        return "file vanished before it could be read"
    if "Permission denied" in stderr_tail:
        return "cannot read file: permission denied"
    if "does not contain any stream" in stderr_tail:
        return "no audio stream (ffmpeg found nothing to decode)"
    refused = _NOT_WHITELISTED.search(stderr_tail)
    if refused:
        return (
            f"not a media file ffmpeg can read: its format ({refused.group(1)}) "
            "is not an audio or video container whisperd accepts"
        )
    detail = _last_line(path, stderr_tail) or "ffmpeg gave no reason"
    return f"not a media file ffmpeg can read: {detail}"


def _last_line(path: str, stderr_tail: str) -> str:
    """The last non-empty stderr line, made readable.

    ffmpeg ends a failure with "file:PATH: <error code text>" (often just
    "Invalid argument"), right after the line that says what was wrong, such
    as "moov atom not found"; both are kept, and the file name is dropped
    (MediaError names the file already, and a name may hold newlines).
    """
    file_mark = "\x00"
    text = stderr_tail.replace("file:" + os.path.abspath(path) + ": ", file_mark)
    lines = [_LOG_CONTEXT.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    if not last.startswith(file_mark):
        return last
    last = last.removeprefix(file_mark)
    if len(lines) > 1 and not lines[-2].startswith(file_mark):
        return f"{lines[-2]} ({last})"
    return last


def _media_info_from_report(report: dict[str, Any]) -> MediaInfo:
    fmt = report.get("format") or {}
    streams = report.get("streams") or []
    audio = [s for s in streams if _is_real_audio(s)]
    duration = _seconds(fmt.get("duration"))
    if duration == 0.0:
        duration = max((_seconds(s.get("duration")) for s in streams), default=0.0)
    codec = audio[0].get("codec_name") if audio else None
    return MediaInfo(
        duration_seconds=duration,
        has_audio=bool(audio),
        format_name=str(fmt.get("format_name") or "unknown format"),
        audio_codec=str(codec) if codec else None,
    )


def _is_real_audio(stream: dict[str, Any]) -> bool:
    """An audio stream ffmpeg can decode has a sample rate; ffprobe also
    reports "mp3" streams with rate 0 in files of zeros or junk."""
    if stream.get("codec_type") != "audio":
        return False
    try:
        return int(str(stream.get("sample_rate", "0"))) > 0
    except ValueError:
        return False


def _seconds(value: object) -> float:
    """ffprobe durations are strings, "N/A" when unknown."""
    try:
        seconds = float(str(value))
    except ValueError:
        return 0.0
    return seconds if seconds > 0 and seconds != float("inf") else 0.0


def _format_number(value: float) -> str:
    """12.34 -> "12.3", 100.0 -> "100", 0.0042 -> "0.0042": short but never a misleading 0."""
    if value >= 0.1:
        return f"{value:.1f}".removesuffix(".0")
    return f"{value:.2g}"
