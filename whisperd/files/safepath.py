"""Paths under a configured folder, without following links.

Users may create folders and links inside the folders whisperd serves. A
path `root/sub/talk.wav` checked once and opened later could, in between,
have `sub` replaced by a link to any other folder. Two tools keep whisperd
inside its folders:

- open_beneath opens a file component by component from the root's own
  descriptor, with O_NOFOLLOW on each, so no link is followed at any level,
  and returns the descriptor: the file checked is then the file read;
- check_beneath verifies, just before a move or a write, that a folder under
  the root is reached without passing through a link.

The configured root itself may be a link (an operator's choice); what lies
under it may not.
"""

from __future__ import annotations

import contextlib
import errno
import os

# Shown when a link is found where whisperd needs a real folder or file.
REASON_LINK = "a symbolic link is in the path (whisperd does not follow links inside its folders)"


def _parts(rel_path: str) -> list[str]:
    parts = [p for p in rel_path.split(os.sep) if p not in ("", os.curdir)]
    if os.path.isabs(rel_path) or os.pardir in parts:
        raise ValueError(f"{rel_path!r}: must be a path inside its folder")
    return parts


def _link_error(root: str, rel_path: str) -> OSError:
    return OSError(errno.ELOOP, REASON_LINK, os.path.join(root, rel_path))


def _open_dir(name: str, dir_fd: int, root: str, rel_path: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        # A link opened with O_NOFOLLOW | O_DIRECTORY fails with ELOOP (or ENOTDIR).
        is_link = exc.errno == errno.ENOTDIR and os.path.islink(os.path.join(root, rel_path))
        if exc.errno == errno.ELOOP or is_link:
            raise _link_error(root, rel_path) from exc
        raise


def open_dir_beneath(root: str, rel_dir: str) -> int:
    """A descriptor of root/rel_dir, reached without following any link below root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in _parts(rel_dir):
            walked = os.path.join(walked, part)
            next_fd = _open_dir(part, fd, root, walked)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root: str, rel_path: str, flags: int = os.O_RDONLY) -> int:
    """Open root/rel_path with flags (plus O_NOFOLLOW | O_CLOEXEC) and return
    the descriptor; no link is followed at any level below root. Raises
    OSError (ELOOP, REASON_LINK) where a link is met."""
    parts = _parts(rel_path)
    if not parts:
        raise ValueError(f"{rel_path!r}: does not name a file")
    dir_fd = open_dir_beneath(root, os.path.join(*parts[:-1]) if len(parts) > 1 else "")
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(root, rel_path) from exc
        raise
    finally:
        os.close(dir_fd)


def make_dirs_beneath(root: str, rel_dir: str) -> int:
    """Like open_dir_beneath, but creates missing folders on the way (each
    created through its parent's descriptor, so none lands behind a link).
    The root itself is created if missing."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in _parts(rel_dir):
            walked = os.path.join(walked, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            next_fd = _open_dir(part, fd, root, walked)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_beneath(root: str, rel_dir: str) -> None:
    """Raise OSError (ELOOP, REASON_LINK) unless root/rel_dir is a folder
    reached from root without following a link (a missing one is fine: it
    will be created as a real folder)."""
    with contextlib.suppress(FileNotFoundError):
        os.close(open_dir_beneath(root, rel_dir))


def open_source_beneath(root: str, rel_path: str) -> tuple[int, bool]:
    """Open the file root/rel_path for reading, without following a link
    anywhere above it; returns (descriptor, whether its last component was a
    link). A link as the last component (inboxes may allow those) is followed
    only to a file inside root, itself reached without links. O_NONBLOCK so a
    FIFO swapped in cannot hang the open."""
    parts = _parts(rel_path)
    if not parts:
        raise ValueError(f"{rel_path!r}: does not name a file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = open_dir_beneath(root, os.path.join(*parts[:-1]) if len(parts) > 1 else "")
    try:
        try:
            return os.open(parts[-1], flags, dir_fd=dir_fd), False
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
    finally:
        os.close(dir_fd)
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, rel_path))
    if target == real_root or os.path.commonpath([real_root, target]) != real_root:
        raise OSError(errno.ELOOP, "symbolic link points outside the inbox", os.path.join(root, rel_path))
    return open_beneath(real_root, os.path.relpath(target, real_root), os.O_RDONLY | os.O_NONBLOCK), True
