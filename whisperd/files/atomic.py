"""Files that appear whole or not at all.

The one atomic-write helper: data goes to a temp file in the target's own
folder (so the rename never crosses a file system), is fsynced, renamed into
place, and the folder is fsynced. The target's folder is created and entered
beneath a given root without following a link. Temp files carry `TMP_MARKER`
so a restart can sweep away what a crash left behind. Transcripts, error
notes, imported model checkpoints and the daemon's token files are all
written through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from whisperd.errors import OutputError
from whisperd.files import safepath
from whisperd.files.names import fit_name

# Suffix of every temp file this module creates; the full name is
# `.<final name>.<random>.whisperd-tmp`, in the final file's own folder so the
# rename that publishes it never crosses a file system.
TMP_MARKER = ".whisperd-tmp"

# At most this many bytes of the final name are repeated in a temp name, so the
# temp name stays under the usual 255-byte name limit.
_TEMP_NAME_BYTES = 200

# Reasons shown to users for the errors they can act on; others use strerror.
_ERRNO_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}

# Writes the content of a file to the (binary) stream it is given.
Writer = Callable[[IO[bytes]], None]


def bytes_writer(data: bytes) -> Writer:
    """A Writer that writes `data`."""

    def write(stream: IO[bytes]) -> None:
        stream.write(data)

    return write


def describe(exc: OSError) -> str:
    """A short reason a user can act on."""
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return exc.strerror or str(exc)


def fsync_fd(dir_fd: int) -> None:
    """fsync an open folder; file systems that cannot do it are not a failed write."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def fsync_dir(folder: str) -> None:
    fd = os.open(folder or os.curdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def discard(path: str) -> None:
    """Remove a file or link if it is there; cleanup must not mask the real error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def temp_prefix(name: str) -> str:
    """The start of every temp name for `name`: deterministic, so a sweep
    finds what a crash left for it."""
    return f".{fit_name(name, limit=_TEMP_NAME_BYTES)}."


def temp_path_for(path: str) -> str:
    """A fresh temp path next to `path`."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{temp_prefix(name)}{secrets.token_hex(8)}{TMP_MARKER}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_MARKER)


@dataclass
class Staged:
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


def stage(path: str, write: Writer, root: str | None = None, mode: int | None = None) -> Staged:
    """Write a fsynced temp file next to path with `write`. Its permissions
    are `mode` when given, else 0o666 less the umask, as for any file a
    program creates. On failure nothing is left behind and the error propagates."""
    dir_fd = _open_target_folder(path, root)
    name = os.path.basename(path)
    staged = Staged(dir_fd, os.path.basename(temp_path_for(name)), name, path)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(staged.tmp, flags, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as stream:
            if mode is not None:
                os.fchmod(stream.fileno(), mode)  # whatever the umask says
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        staged.discard(staged.tmp)
        staged.close()
        raise
    return staged


def commit(staged: Staged) -> None:
    """Rename a staged file into place and fsync its folder."""
    # A link at the final name is replaced itself, never followed.
    os.replace(staged.tmp, staged.name, src_dir_fd=staged.dir_fd, dst_dir_fd=staged.dir_fd)
    fsync_fd(staged.dir_fd)


def write_stream_atomic(path: str, write: Writer, root: str | None = None, mode: int | None = None) -> None:
    """Write path through `write` so that it is either untouched or complete.

    Creates missing parent folders below root (default: path's own folder),
    never through a link. Raises the OSError; no temp file is left.
    """
    staged = stage(path, write, root, mode)
    try:
        commit(staged)
    except BaseException:
        staged.discard(staged.tmp)
        raise
    finally:
        staged.close()


def write_atomic(path: str, data: bytes, root: str | None = None) -> None:
    """Write data to path so that path is either untouched or complete.

    Like write_stream_atomic, but raises OutputError naming path and the
    reason ("disk full", "permission denied", a link in the path...).
    """
    try:
        write_stream_atomic(path, bytes_writer(data), root)
    except OSError as exc:
        raise OutputError(path, describe(exc)) from exc
