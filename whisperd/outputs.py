"""Everything a job leaves on disk: transcripts, error notes, the source move (layer L2).

Outputs appear whole or not at all: each is written to a temp file in its
target folder, fsynced, renamed into place, and the folder is fsynced. Temp
files carry `TMP_MARKER` so a restart can sweep away what a crash left behind.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeAlias

import opencc

from whisperd import safepath
from whisperd.errors import OutputError
from whisperd.jobs import OUTPUT_FORMATS, Segment, TranscriptResult
from whisperd.names import NAME_MAX, fit_name, name_bytes, split_ext

# Suffix of every temp file this module creates; the full name is
# `.<final name>.<random>.whisperd-tmp`, in the final file's own folder so the
# rename that publishes it never crosses a file system.
TMP_MARKER = ".whisperd-tmp"

# At most this many bytes of the final name are repeated in a temp name, so the
# temp name stays under the usual 255-byte name limit.
_TEMP_NAME_BYTES = 200

# How many numbered names (`talk.mp3.2`, `talk (2).mp3`...) are tried before
# giving up: far more than any real folder needs, but finite.
_MAX_NAME_TRIES = 10_000

# Reasons shown to users for the errors they can act on; others use strerror.
_ERRNO_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}

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


def _describe(exc: OSError) -> str:
    """A short reason a user can act on."""
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return exc.strerror or str(exc)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or os.curdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a folder; that is not a failed write.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    """Remove a file or link if it is there; cleanup must not mask the real error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


# ---------------------------------------------------------------- atomic writes


def _temp_prefix(name: str) -> str:
    # Deterministic, so temp_glob finds what a crash left for this name.
    return f".{fit_name(name, limit=_TEMP_NAME_BYTES)}."


def _temp_name_for(name: str) -> str:
    return f"{_temp_prefix(name)}{secrets.token_hex(8)}{TMP_MARKER}"


def _temp_path_for(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, _temp_name_for(name))


def temp_glob(path: str) -> str:
    """A glob pattern matching the temp files a write of path may leave."""
    folder, name = os.path.split(path)
    return os.path.join(glob.escape(folder), f"{glob.escape(_temp_prefix(name))}*{TMP_MARKER}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass
class _Staged:
    """A fsynced temp file waiting to be renamed to `name`, both in the
    folder open as dir_fd (reached from the root without following links)."""

    dir_fd: int
    tmp: str
    name: str
    path: str

    def discard(self, which: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(which, dir_fd=self.dir_fd)

    def close(self) -> None:
        os.close(self.dir_fd)


def _open_target_folder(path: str, root: str | None) -> int:
    """The folder of path, created if missing, reached from root (default:
    the folder itself) without following a link; OSError (ELOOP) on a link."""
    folder = os.path.dirname(path) or os.curdir
    if root is not None and not os.path.isabs(root):
        # A configured folder is always absolute; a relative one would be the cwd's.
        raise OSError(errno.EINVAL, f"folder {root!r} is not an absolute path", path)
    base = folder if root is None else root
    rel_dir = os.path.relpath(folder, base)
    if rel_dir == os.pardir or rel_dir.startswith(os.pardir + os.sep):
        raise OSError(errno.EXDEV, f"not inside its folder {base}", path)
    return safepath.make_dirs_beneath(base, "" if rel_dir == os.curdir else rel_dir)


def _stage(path: str, data: bytes, root: str | None) -> _Staged:
    """Write data to a fsynced temp file next to path. On failure nothing is
    left behind and the OSError propagates."""
    dir_fd = _open_target_folder(path, root)
    staged = _Staged(dir_fd, _temp_name_for(os.path.basename(path)), os.path.basename(path), path)
    try:
        # 0o666 so the umask decides, as for any file a program creates.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(staged.tmp, flags, 0o666, dir_fd=dir_fd)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        staged.discard(staged.tmp)
        staged.close()
        raise
    return staged


def _fsync_fd(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some file systems cannot fsync a folder; that is not a failed write.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _commit(staged: _Staged) -> None:
    # A link at the final name is replaced itself, never followed.
    os.replace(staged.tmp, staged.name, src_dir_fd=staged.dir_fd, dst_dir_fd=staged.dir_fd)
    _fsync_fd(staged.dir_fd)


def write_atomic(path: str, data: bytes, root: str | None = None) -> None:
    """Write data to path so that path is either untouched or complete.

    Creates missing parent folders below root (default: path's own folder),
    never through a link. Raises OutputError naming path and the reason
    ("disk full", "permission denied", a link in the path...); no temp file
    is left.
    """
    try:
        staged = _stage(path, data, root)
    except OSError as exc:
        raise OutputError(path, _describe(exc)) from exc
    try:
        _commit(staged)
    except OSError as exc:
        staged.discard(staged.tmp)
        raise OutputError(path, _describe(exc)) from exc
    finally:
        staged.close()


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_MARKER)


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temp files a crash left anywhere under folder; return their paths.

    Call it only while nothing is writing into folder (at start-up): a live
    writer's temp file looks exactly like a stale one. Files that cannot be
    removed are left alone and not returned. Symlinked folders are not entered.
    """
    removed: list[str] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not _is_temp_name(name):
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


def chinese_configs() -> tuple[str, ...]:
    """The OpenCC conversions the installed opencc ships (s2t, t2s, s2twp...)."""
    return tuple(sorted(name.removesuffix(".json") for name in opencc.CONFIGS))


def _unchanged(text: str) -> str:
    return text


def make_converter(config: str) -> ChineseConverter:
    """A converter for an OpenCC config name; "" converts nothing."""
    if not config:
        return _unchanged
    valid = chinese_configs()
    if config not in valid:
        raise ValueError(f"unknown OpenCC config {config!r}; valid configs: {', '.join(valid)}")
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
    # Room for the longest `.<fmt>` the base will carry (names.py says why).
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
    staged: list[_Staged] = []
    try:
        for path, data in zip(paths, contents.values(), strict=True):
            try:
                staged.append(_stage(path, data, root))
            except OSError as exc:
                raise OutputError(path, _describe(exc)) from exc
        _commit_all(staged)
    except BaseException:
        for item in staged:
            item.discard(item.tmp)
        raise
    finally:
        for item in staged:
            item.close()
    return paths


def _commit_all(staged: list[_Staged]) -> None:
    placed: list[_Staged] = []
    for item in staged:
        try:
            _commit(item)
        except OSError as exc:
            for done in placed:
                done.discard(done.name)
            raise OutputError(item.path, _describe(exc)) from exc
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


def _copy_across(src: str, dest: str) -> None:
    """Move src onto dest (its placeholder) across file systems: copy to a
    temp, fsync, rename over dest, then unlink src. On failure src is kept and
    dest removed, so there is always exactly one copy."""
    tmp = _temp_path_for(dest)
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)
        if not os.path.islink(tmp):
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
        _fsync_dir(os.path.dirname(dest))
        # Someone else removing src meanwhile is fine: the copy is the file now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)
    except BaseException:
        _discard(tmp)
        _discard(dest)
        raise


def _move_onto(src: str, folder_fd: int, name: str, dest: str) -> None:
    """Move src onto dest (name in the folder open as folder_fd), an empty
    placeholder, which is removed if the move fails."""
    try:
        os.rename(src, name, dst_dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=folder_fd)
            raise
        _copy_across(src, dest)
    else:
        _fsync_fd(folder_fd)
    _fsync_dir(os.path.dirname(src))


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
        raise OutputError(src, _describe(exc)) from exc
    folder = os.path.join(dest_dir, os.path.dirname(clean))
    try:
        _check_no_links(src, clean)
    except OSError as exc:
        raise OutputError(src, f"cannot move from here: {_describe(exc)}") from exc
    try:
        # Created and entered from dest_dir without following a link: the
        # move lands inside dest_dir, whatever is swapped in meanwhile.
        folder_fd = safepath.make_dirs_beneath(dest_dir, os.path.dirname(clean))
    except OSError as exc:
        raise OutputError(src, f"cannot move into {folder}: {_describe(exc)}") from exc
    try:
        try:
            name = _reserve_name(folder_fd, folder, os.path.basename(clean))
        except OSError as exc:
            raise OutputError(src, f"cannot move into {folder}: {_describe(exc)}") from exc
        dest = os.path.join(folder, name)
        try:
            _move_onto(src, folder_fd, name, dest)
        except OSError as exc:
            reason = "source file is gone" if exc.errno == errno.ENOENT else _describe(exc)
            raise OutputError(src, f"cannot move to {dest}: {reason}") from exc
    finally:
        os.close(folder_fd)
    return dest
