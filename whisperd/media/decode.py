"""Everything whisperd asks of ffmpeg and ffprobe.

This is the only module that runs them. Source files come from inbox folders
anyone may write to, so every call is built to read exactly one local file:

- an argument list, never a shell;
- the input is ``file:`` + the absolute path (or ``/dev/fd/N`` of the file
  opened once, see opened_source), so a name such as ``-y.wav``,
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

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from whisperd.errors import MediaError
from whisperd.files import safepath
from whisperd.media import tool as media_tool

# Samples per second of the mono float32 audio decode_audio produces and
# every engine (and VAD) takes: Whisper's own input rate.
SAMPLE_RATE = 16000

# ffmpeg writes s16le: two bytes a sample.
_BYTES_PER_SAMPLE = 2
# Peak bytes of memory a decoded sample costs (see default_max_decode_seconds).
_DECODE_BYTES_PER_SAMPLE = 8

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

# Default limit for ffprobe; reading headers takes well under a second.
PROBE_TIMEOUT_SECONDS = 60.0

_BYTES_PER_MB = 1_000_000
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


def probe(path: str, *, timeout: float = PROBE_TIMEOUT_SECONDS, fd: int | None = None) -> MediaInfo:
    """Read the container and stream headers of `path` with ffprobe.

    `fd`, when given, is an open descriptor of `path`: ffprobe reads it, not
    the path (see _input_args). Raises MediaError when ffprobe cannot read
    the file or times out.
    """
    args = [
        "ffprobe",
        "-v",
        "error",
        "-hide_banner",
        *_input_args(path, fd),
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
    ]
    run = media_tool.run_tool(args, path=path, timeout=timeout, action="reading media info", fd=fd)
    if run.returncode != 0:
        raise MediaError(path, _failure_reason(path, run.stderr_tail, fd))
    try:
        report = json.loads(run.stdout.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        reason = f"not a media file ffmpeg can read: ffprobe gave no usable report ({exc})"
        raise MediaError(path, reason) from exc
    return _media_info_from_report(report)


def decode_audio(
    path: str, *, timeout: float | None = None, fd: int | None = None, max_seconds: float | None = None
) -> npt.NDArray[np.float32]:
    """Decode `path`'s audio to mono float32 at SAMPLE_RATE (ffmpeg picks
    the stream, as whisper.load_audio does: the one with the most channels).

    The same conversion as whisper.load_audio (s16le from ffmpeg, / 32768),
    streamed from ffmpeg's stdout without temporary files. A truncated file
    yields the part ffmpeg could decode; a file that yields no samples at all
    is an error. `timeout` (seconds, None for no limit) bounds the whole run.
    `fd`: an open descriptor of `path` to decode instead of the path.
    `max_seconds` bounds what is actually decoded (whatever the container
    claims): ffmpeg is stopped and MediaError raised once the audio is longer.
    """
    _stat_source(path, fd)
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE) * _BYTES_PER_SAMPLE
    try:
        run = media_tool.run_tool(
            _decode_args(path, fd), path=path, timeout=timeout, action="decoding", fd=fd, max_stdout=limit
        )
    except media_tool.OverLimit:
        longest = media_tool.format_number(max_seconds or 0.0)
        raise MediaError(path, f"audio is longer than {longest} s, the limit for this worker") from None
    if run.returncode != 0:
        raise MediaError(path, _failure_reason(path, run.stderr_tail, fd))
    samples = np.frombuffer(run.stdout, dtype="<i2", count=len(run.stdout) // 2)
    if samples.size == 0:
        detail = _last_line(path, run.stderr_tail, fd)
        raise MediaError(path, "no audio could be decoded" + (f": {detail}" if detail else ""))
    audio = samples.astype(np.float32)
    audio /= 32768.0
    return audio


def _decode_args(path: str, fd: int | None) -> list[str]:
    """ffmpeg's arguments for decode_audio: the audio stream ffmpeg picks,
    as mono s16le at SAMPLE_RATE on stdout."""
    return [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        *_input_args(path, fd),
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


def check_source(
    path: str, *, max_size_bytes: int = 0, max_duration_seconds: float = 0.0, fd: int | None = None
) -> MediaInfo:
    """Every check a source passes before it is queued, cheapest first.

    `max_size_bytes` and `max_duration_seconds` are the inbox limits (0: none).
    Returns what ffprobe found; raises MediaError with the first reason the
    file cannot be used. `fd`: an open descriptor of `path` to check instead.
    """
    st = _stat_source(path, fd)
    if max_size_bytes > 0 and st.st_size > max_size_bytes:
        raise MediaError(
            path,
            f"file is {media_tool.format_number(st.st_size / _BYTES_PER_MB)} MB, over the inbox limit of "
            f"{media_tool.format_number(max_size_bytes / _BYTES_PER_MB)} MB",
        )
    if fd is None:
        _check_readable(path)
    info = probe(path, fd=fd)
    if not info.has_audio:
        raise MediaError(path, f"no audio stream (ffprobe found: {info.format_name})")
    if max_duration_seconds > 0 and info.duration_seconds > max_duration_seconds:
        raise MediaError(
            path,
            f"audio is {media_tool.format_number(info.duration_seconds)} s long, over the inbox limit of "
            f"{media_tool.format_number(max_duration_seconds)} s",
        )
    return info


def reject_kind(reason: str) -> str | None:
    """The metrics' reject reason for a MediaError reason that is the file
    breaking an inbox rule (too large, too long, empty, not media), or None
    for a failure that is not the file's fault (vanished, unreadable, timeout)."""
    if reason == "file is empty":
        return "empty"
    if reason.startswith("file is ") and "over the inbox limit" in reason:
        return "too_large"
    if reason.startswith("audio is ") and "over the inbox limit" in reason:
        return "too_long"
    if reason.startswith(("not a media file", "no audio stream")):
        return "not_media"
    return None


@contextlib.contextmanager
def _read_errors(path: str) -> Iterator[None]:
    """An OSError while opening or stat()ing the source, as the MediaError
    the user reads in NAME.error.txt."""
    try:
        yield
    except FileNotFoundError as exc:
        raise MediaError(path, "file vanished before it could be read") from exc
    except PermissionError as exc:
        raise MediaError(path, "cannot read file: permission denied") from exc
    except OSError as exc:
        raise MediaError(path, f"cannot read file: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def opened_source(root: str, rel_path: str, expected: tuple[int, int] | None = None) -> Iterator[int]:
    """The source root/rel_path opened once, with no link followed above it
    (safepath.open_source_beneath), for probe/decode_audio's `fd`: what is
    checked is what ffmpeg reads. `expected` is the (device, inode) the job
    recorded; a different file found there (swapped in since) is refused."""
    path = os.path.join(root, rel_path)
    with _read_errors(path):
        fd, via_link = safepath.open_source_beneath(root, rel_path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(path, "not a regular file")
        if expected is not None and not via_link and (st.st_dev, st.st_ino) != expected:
            raise MediaError(path, "a different file took its place while it was being opened")
        yield fd
    finally:
        os.close(fd)


def _input_name(path: str, fd: int | None) -> str:
    """ffmpeg's name for the input. An open descriptor is read as /dev/fd/N:
    that opens the very file the descriptor holds (seekable, unlike pipe:N),
    whatever the path names by now."""
    return "file:" + (f"/dev/fd/{fd}" if fd is not None else os.path.abspath(path))


def _input_args(path: str, fd: int | None = None) -> list[str]:
    """Input options and the input itself; input options must precede -i."""
    return [
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        ",".join(ALLOWED_DEMUXERS),
        "-i",
        _input_name(path, fd),
    ]


def _stat_source(path: str, fd: int | None = None) -> os.stat_result:
    """stat() the source (following symlinks; fstat when fd is given); refuse
    what is not a non-empty regular file (a FIFO or device would block ffmpeg)."""
    with _read_errors(path):
        st = os.stat(path) if fd is None else os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(path, "not a regular file")
    if st.st_size == 0:
        raise MediaError(path, "file is empty")
    return st


def _check_readable(path: str) -> None:
    """Open the file as ffmpeg will; O_NONBLOCK so a FIFO swapped in cannot hang us."""
    with _read_errors(path):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(fd)


def default_max_decode_seconds(memory_bytes: int = 0) -> float:
    """Longest audio a worker decodes when no inbox limit is set: a quarter
    of memory_bytes (the worker's budget; 0: the machine's memory) at
    _DECODE_BYTES_PER_SAMPLE (the s16 buffer, its growth, the float32 copy)."""
    if memory_bytes <= 0:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            memory_bytes = 8 << 30
    return memory_bytes / 4 / _DECODE_BYTES_PER_SAMPLE / SAMPLE_RATE


def _failure_reason(path: str, stderr_tail: str, fd: int | None = None) -> str:
    """Turn a failed run into the reason a user reads."""
    if fd is None and not os.path.lexists(path):
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
    detail = _last_line(path, stderr_tail, fd) or "ffmpeg gave no reason"
    return f"not a media file ffmpeg can read: {detail}"


def _last_line(path: str, stderr_tail: str, fd: int | None = None) -> str:
    """The last non-empty stderr line, made readable.

    ffmpeg ends a failure with "file:PATH: <error code text>" (often just
    "Invalid argument"), right after the line that says what was wrong, such
    as "moov atom not found"; both are kept, and the file name is dropped
    (MediaError names the file already, and a name may hold newlines).
    """
    file_mark = "\x00"
    text = stderr_tail.replace(_input_name(path, fd) + ": ", file_mark)
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
