"""Everything a job leaves on disk: transcripts, error notes, the source move.

Outputs appear whole or not at all: they are written through atomic_files
(temp file, fsync, rename, folder fsync); the temp files a crash left are
found and swept here (`temp_glob`, `remove_stale_temps`).

Every path this module builds stays inside the folder it was given: a
`rel_path` that is absolute or climbs out with `..` is refused.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeAlias

import opencc

from whisperd.config import CHINESE_CONFIGS
from whisperd.errors import OutputError
from whisperd.files import atomic as atomic_files
from whisperd.files import safepath
from whisperd.files.atomic import write_atomic
from whisperd.files.names import NAME_MAX, fit_name, name_bytes, split_ext
from whisperd.jobs import OUTPUT_FORMATS, Segment, TranscriptResult

# How many numbered names (`talk.mp3.2`, `talk (2).mp3`...) are tried before
# giving up: far more than any real folder needs, but finite.
_MAX_NAME_TRIES = 10_000
# Read and write size of a copy to another file system.
COPY_CHUNK_BYTES = 1 << 20

# A cue text must not contain the SRT/WebVTT timing arrow.
_ARROW = "-->"
_ARROW_REPLACEMENT = "\u2192"

# A function that converts Chinese text between scripts (see make_converter).
ChineseConverter: TypeAlias = Callable[[str], str]


# ---------------------------------------------------------------- paths


def _checked_rel_path(rel_path: str) -> str:
    """The normalised rel_path, or ValueError if it would leave its folder."""
    if not rel_path or os.path.isabs(rel_path):
        raise ValueError(f"{rel_path!r}: expected a file path relative to its folder")
    if ".." in rel_path.split(os.sep):
        raise ValueError(f"{rel_path!r}: '..' is not allowed, the path must stay inside its folder")
    clean = os.path.normpath(rel_path)
    if clean == os.curdir:
        raise ValueError(f"{rel_path!r}: does not name a file")
    return clean


# ---------------------------------------------------------------- temp files a crash left


def temp_glob(path: str) -> str:
    """A glob pattern matching the temp files a write of path may leave."""
    folder, name = os.path.split(path)
    pattern = f"{glob.escape(atomic_files.temp_prefix(name))}*{atomic_files.TMP_MARKER}"
    return os.path.join(glob.escape(folder), pattern)


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temp files a crash left anywhere under folder; return their paths.

    Call it only while nothing is writing into folder (at start-up): a live
    writer's temp file looks exactly like a stale one. Files that cannot be
    removed are left alone and not returned. Symlinked folders are not entered.
    """
    removed: list[str] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not atomic_files.is_temp_name(name):
                continue
            path = os.path.join(root, name)
            try:
                os.unlink(path)
            except OSError:
                continue
            removed.append(path)
    return sorted(removed)


# ---------------------------------------------------------------- renderers


def _milliseconds(seconds: float) -> int:
    """Whole milliseconds; negative or non-finite times (never expected) become 0."""
    if not math.isfinite(seconds) or seconds < 0:
        return 0
    return round(seconds * 1000)


def _timestamp(total_ms: int, decimal_marker: str) -> str:
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal_marker}{millis:03d}"


def _cue_timing(segment: Segment, decimal_marker: str) -> str:
    start = _milliseconds(segment.start)
    end = max(_milliseconds(segment.end), start)
    return f"{_timestamp(start, decimal_marker)} --> {_timestamp(end, decimal_marker)}"


def _cue_text(text: str) -> str:
    """Stripped lines, no blank ones (a blank line ends a cue), no timing arrow."""
    lines = (line.strip() for line in text.replace(_ARROW, _ARROW_REPLACEMENT).splitlines())
    return "\n".join(line for line in lines if line)


def _cues(result: TranscriptResult) -> list[tuple[Segment, str]]:
    """Segments that have something to show, with their cue text."""
    cues = ((segment, _cue_text(segment.text)) for segment in result.segments)
    return [(segment, text) for segment, text in cues if text]


def _escape_vtt(text: str) -> str:
    # In WebVTT cue text `<` opens a tag and `&` an entity.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_txt(result: TranscriptResult) -> str:
    """One line per segment, as openai-whisper's txt writer does; line breaks
    inside a segment become spaces."""
    texts = [segment.text for segment in result.segments] or [result.text]
    lines = [" ".join(text.split()) for text in texts]
    kept = [line for line in lines if line]
    return "".join(f"{line}\n" for line in kept)


def render_srt(result: TranscriptResult) -> str:
    blocks = [
        f"{index}\n{_cue_timing(segment, ',')}\n{text}\n"
        for index, (segment, text) in enumerate(_cues(result), start=1)
    ]
    return "\n".join(blocks)


def render_vtt(result: TranscriptResult) -> str:
    blocks = [f"{_cue_timing(segment, '.')}\n{_escape_vtt(text)}\n" for segment, text in _cues(result)]
    return "\n".join(["WEBVTT\n", *blocks])


def render_tsv(result: TranscriptResult) -> str:
    """start and end in integer milliseconds, like openai-whisper's tsv writer."""
    rows = ["start\tend\ttext"]
    for segment in result.segments:
        text = " ".join(segment.text.replace("\t", " ").split())
        if text:
            start = _milliseconds(segment.start)
            rows.append(f"{start}\t{max(_milliseconds(segment.end), start)}\t{text}")
    return "".join(f"{row}\n" for row in rows)


def _finite_json(value: Any) -> Any:
    """value with NaN/inf floats replaced by None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def render_json(result: TranscriptResult, metadata: Mapping[str, Any]) -> str:
    """openai-whisper's result dict plus a "whisperd" key holding metadata
    (which must be JSON-serialisable: source, model, device, durations...)."""
    document = result.to_dict()
    document["whisperd"] = dict(metadata)
    return json.dumps(_finite_json(document), ensure_ascii=False, indent=2) + "\n"


def render_outputs(
    result: TranscriptResult, formats: Sequence[str], metadata: Mapping[str, Any]
) -> dict[str, bytes]:
    """Each requested format rendered and UTF-8 encoded, keyed by format."""
    renderers: dict[str, Callable[[TranscriptResult], str]] = {
        "txt": render_txt,
        "srt": render_srt,
        "vtt": render_vtt,
        "tsv": render_tsv,
        "json": lambda res: render_json(res, metadata),
    }
    contents: dict[str, bytes] = {}
    for fmt in formats:
        if fmt not in renderers:
            raise ValueError(f"unknown output format {fmt!r}; valid formats: {', '.join(OUTPUT_FORMATS)}")
        contents[fmt] = renderers[fmt](result).encode("utf-8")
    return contents


# ---------------------------------------------------------------- Chinese scripts


def _unchanged(text: str) -> str:
    return text


def make_converter(config: str) -> ChineseConverter:
    """A converter for an OpenCC config name; "" converts nothing."""
    if not config:
        return _unchanged
    if config not in CHINESE_CONFIGS:
        raise ValueError(f"unknown OpenCC config {config!r}; valid configs: {', '.join(CHINESE_CONFIGS)}")
    converter = opencc.OpenCC(config)

    def convert(text: str) -> str:
        return str(converter.convert(text))

    return convert


def convert_result(result: TranscriptResult, convert: ChineseConverter) -> TranscriptResult:
    """result with its text, every segment text and every word converted."""
    segments = tuple(
        replace(
            segment,
            text=convert(segment.text),
            words=tuple(replace(word, word=convert(word.word)) for word in segment.words),
        )
        for segment in result.segments
    )
    return replace(result, text=convert(result.text), segments=segments)


# ---------------------------------------------------------------- transcript files


def choose_output_base(
    output_dir: str, rel_path: str, formats: Sequence[str], is_taken: Callable[[str], bool]
) -> str:
    """Path, without extension, for the outputs of source rel_path.

    `sub/talk.mp3` gives `output_dir/sub/talk`; if any `talk.<fmt>` belongs to
    another source (is_taken), `talk.mp3`, then `talk.mp3.2`, `talk.mp3.3`...
    """
    clean = _checked_rel_path(rel_path)
    folder = os.path.join(output_dir, os.path.dirname(clean))
    name = os.path.basename(clean)
    stem = os.path.splitext(name)[0]
    numbered = (f"{name}.{number}" for number in range(2, _MAX_NAME_TRIES))
    # Room for the longest `.<fmt>` the base will carry (files/names.py says why).
    room = NAME_MAX - max((name_bytes(f".{fmt}") for fmt in formats), default=0)
    for candidate in itertools.chain(dict.fromkeys([stem, name]), numbered):
        base = os.path.join(folder, fit_name(*split_ext(candidate), limit=room))
        if not any(is_taken(f"{base}.{fmt}") for fmt in formats):
            return base
    raise OutputError(os.path.join(folder, name), "no free output name")


def write_outputs(base: str, contents: Mapping[str, bytes], root: str | None = None) -> list[str]:
    """Write `base.<fmt>` for each entry, all or nothing; return the paths.

    root is the configured output folder: the folders between it and base
    are created, and entered, without following links. Every file is staged
    (temp file, fsync) before any is renamed into place; if a rename fails,
    the outputs this call already placed are removed.
    """
    paths = [f"{base}.{fmt}" for fmt in contents]
    staged: list[atomic_files.Staged] = []
    try:
        for path, data in zip(paths, contents.values(), strict=True):
            try:
                staged.append(atomic_files.stage(path, atomic_files.bytes_writer(data), root))
            except OSError as exc:
                raise OutputError(path, atomic_files.describe(exc)) from exc
        _commit_all(staged)
    except BaseException:
        for item in staged:
            item.discard(item.tmp)
        raise
    finally:
        for item in staged:
            item.close()
    return paths


def _commit_all(staged: list[atomic_files.Staged]) -> None:
    placed: list[atomic_files.Staged] = []
    for item in staged:
        try:
            atomic_files.commit(item)
        except OSError as exc:
            for done in placed:
                done.discard(done.name)
            raise OutputError(item.path, atomic_files.describe(exc)) from exc
        placed.append(item)


# ---------------------------------------------------------------- error notes


def _note_lines(label: str, value: str, width: int) -> list[str]:
    first, *rest = value.splitlines() or [""]
    pad = " " * (width + 2)
    return [f"{label + ':':<{width + 1}} {first}", *(f"{pad}{line}" for line in rest)]


def write_error_note(failed_dir: str, rel_path: str, reason: str, details: Mapping[str, str]) -> str:
    """Write `failed_dir/sub/NAME.error.txt` telling a person why NAME failed.

    details (attempts, model, job id...) are listed as given. Returns the path.
    """
    clean = _checked_rel_path(rel_path)
    folder, name = os.path.split(clean)
    stem, ext = split_ext(name)
    path = os.path.join(failed_dir, folder, fit_name(stem, f"{ext}.error.txt"))
    fields = {
        "File": clean,
        "Reason": reason,
        "When": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    for label, value in details.items():
        fields.setdefault(label, value)
    width = max(len(label) for label in fields)
    lines = ["whisperd could not transcribe this file.", ""]
    for label, value in fields.items():
        lines.extend(_note_lines(label, value, width))
    lines += ["", "To try again, put the file back into its inbox."]
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"), root=failed_dir)
    return path


# ---------------------------------------------------------------- moving the source


def _numbered_names(name: str) -> Iterator[str]:
    stem, ext = split_ext(name)
    yield fit_name(stem, ext)
    for number in range(2, _MAX_NAME_TRIES):
        yield fit_name(stem, f" ({number}){ext}")


def _reserve_name(folder_fd: int, folder: str, name: str) -> str:
    """Claim a free name in folder (open as folder_fd) with an empty
    placeholder (O_EXCL, so two movers never get the same one) and return
    the name."""
    for candidate in _numbered_names(name):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(candidate, flags, 0o600, dir_fd=folder_fd)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free name", os.path.join(folder, name))


def _copy_across(src: str, folder_fd: int, name: str) -> None:
    """Move src onto `name` (its placeholder, in the folder open as folder_fd)
    across file systems: copy into a temp in that folder, fsync, rename over
    the placeholder, then unlink src. Every write goes through folder_fd, so a
    link swapped in for the folder meanwhile is never followed. On failure src
    is kept and the placeholder removed: there is always exactly one copy."""
    tmp = atomic_files.temp_prefix(name) + secrets.token_hex(8) + atomic_files.TMP_MARKER
    try:
        if stat.S_ISLNK(os.lstat(src).st_mode):
            os.symlink(os.readlink(src), tmp, dir_fd=folder_fd)  # a link job moves as a link
        else:
            _copy_file_into(src, folder_fd, tmp)
        os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        atomic_files.fsync_fd(folder_fd)
        # Someone else removing src meanwhile is fine: the copy is the file now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)
    except BaseException:
        for leftover in (tmp, name):
            with contextlib.suppress(OSError):
                os.unlink(leftover, dir_fd=folder_fd)
        raise


def _copy_file_into(src: str, folder_fd: int, tmp: str) -> None:
    """Copy src (not a link) to a new file `tmp` in the folder open as
    folder_fd, with src's mode and times, fsynced."""
    source = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(source)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        target = os.open(tmp, flags, 0o600, dir_fd=folder_fd)
        try:
            with open(source, "rb", closefd=False) as reader, open(target, "wb", closefd=False) as writer:
                shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)
            os.fchmod(target, stat.S_IMODE(info.st_mode))
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _move_onto(src: str, folder_fd: int, name: str) -> None:
    """Move src onto `name` in the folder open as folder_fd (an empty
    placeholder), which is removed if the move fails."""
    try:
        os.rename(src, name, dst_dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=folder_fd)
            raise
        _copy_across(src, folder_fd, name)
    else:
        atomic_files.fsync_fd(folder_fd)
    atomic_files.fsync_dir(os.path.dirname(src))


def _check_no_links(src: str, clean: str) -> None:
    """Refuse a source whose folders (below the root it was queued in, which
    src ends with clean under) include a link: a rename would follow it."""
    parts = clean.split(os.sep)
    src_parts = os.path.normpath(src).split(os.sep)
    if len(parts) > 1 and src_parts[-len(parts) :] == parts:
        root = os.sep.join(src_parts[: -len(parts)]) or os.sep
        safepath.check_beneath(root, os.path.dirname(clean))


def move_source(src: str, dest_dir: str, rel_path: str) -> str:
    """Move src to dest_dir/rel_path, never overwriting: a taken name becomes
    `talk (2).mp3`, `talk (3).mp3`... A symlink is moved as a link. Returns
    the final path; raises OutputError (naming src) if the move fails."""
    clean = _checked_rel_path(rel_path)
    try:
        os.lstat(src)
    except FileNotFoundError as exc:
        raise OutputError(
            src, f"source file is gone (moved or deleted) before it could go to {dest_dir}"
        ) from exc
    except OSError as exc:
        raise OutputError(src, atomic_files.describe(exc)) from exc
    folder = os.path.join(dest_dir, os.path.dirname(clean))
    try:
        _check_no_links(src, clean)
    except OSError as exc:
        raise OutputError(src, f"cannot move from here: {atomic_files.describe(exc)}") from exc
    try:
        # Created and entered from dest_dir without following a link: the
        # move lands inside dest_dir, whatever is swapped in meanwhile.
        folder_fd = safepath.make_dirs_beneath(dest_dir, os.path.dirname(clean))
    except OSError as exc:
        raise OutputError(src, f"cannot move into {folder}: {atomic_files.describe(exc)}") from exc
    try:
        try:
            name = _reserve_name(folder_fd, folder, os.path.basename(clean))
        except OSError as exc:
            raise OutputError(src, f"cannot move into {folder}: {atomic_files.describe(exc)}") from exc
        dest = os.path.join(folder, name)
        try:
            _move_onto(src, folder_fd, name)
        except OSError as exc:
            reason = "source file is gone" if exc.errno == errno.ENOENT else atomic_files.describe(exc)
            raise OutputError(src, f"cannot move to {dest}: {reason}") from exc
    finally:
        os.close(folder_fd)
    return dest
