"""The watcher's rules: which names are
media worth settling, what one inbox is (WatchSpec), which of its folders a
path lies in, and what one look at a path finds (a file, a refused link,
nothing). Pure functions of the file system; no threads, no state.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from whisperd.jobs import FileIdentity

# The watcher's logger: its lines keep the name they always had.
logger = logging.getLogger("whisperd.watch.watcher")


# Lower-case extensions (with the dot) of files ffmpeg can decode audio from.
# fmt: off
MEDIA_EXTENSIONS: frozenset[str] = frozenset(
    {
        # audio
        ".wav", ".wave", ".mp3", ".mp2", ".mpga", ".flac", ".ogg", ".oga", ".opus", ".spx",
        ".m4a", ".m4b", ".aac", ".wma", ".aif", ".aiff", ".aifc", ".au", ".caf", ".mka",
        ".ac3", ".amr", ".awb", ".wv", ".ape", ".weba",
        # video (the audio track is transcribed)
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpeg", ".mpg", ".ts", ".mts",
        ".m2ts", ".3gp", ".3g2", ".wmv", ".flv", ".ogv", ".vob",
    }
)
# fmt: on

# Final suffixes that browsers, downloaders and copy tools give a file while it
# is still being written; the file is taken only once renamed.
TEMP_SUFFIXES: frozenset[str] = frozenset({".part", ".crdownload", ".tmp", ".partial", ".download"})

# Marker whisperd puts in the names of its own temporary files.
TEMP_MARKER = ".whisperd-tmp"

REASON_SYMLINK_REFUSED = "symbolic links are not accepted in this inbox (allow_symlinks = false)"
REASON_SYMLINK_OUTSIDE = "symbolic link points outside the inbox"
# A settled file whose extension is not in MEDIA_EXTENSIONS: reported once
# (on_rejected) and left where it is, so the user sees why nothing happens.
REASON_UNSUPPORTED_PREFIX = "unsupported extension"


def is_candidate_name(name: str) -> bool:
    """True when a file name (or path) looks like finished media worth settling."""
    base = os.path.basename(name)
    if not base or base.startswith(".") or base.endswith("~") or TEMP_MARKER in base:
        return False
    suffix = os.path.splitext(base)[1].lower()
    return suffix in MEDIA_EXTENSIONS and suffix not in TEMP_SUFFIXES


def unsupported_reason(name: str) -> str | None:
    """Why a finished-looking file that is not media is not taken
    ("unsupported extension .docx"); None for media and for files still being
    written or hidden (temporary names, dot files, editor backups)."""
    base = os.path.basename(name)
    if not base or base.startswith(".") or base.endswith("~") or TEMP_MARKER in base:
        return None
    suffix = os.path.splitext(base)[1].lower()
    if suffix in MEDIA_EXTENSIONS or suffix in TEMP_SUFFIXES:
        return None
    return f"{REASON_UNSUPPORTED_PREFIX} {suffix or '(none)'}"


def is_watched_name(name: str) -> bool:
    """A name the watcher follows: media to settle, or a file to refuse once settled."""
    return is_candidate_name(name) or unsupported_reason(name) is not None


@dataclass(frozen=True, kw_only=True)
class WatchSpec:
    """One inbox as the watcher sees it."""

    # Inbox name (config [[inbox]] name), passed back in every callback.
    name: str
    # Absolute inbox folder; subfolders are watched too.
    root: str
    # Absolute cancel folder for this inbox, watched recursively too.
    cancel_dir: str
    # "native" (inotify through watchdog's Observer) or "poll" (watchdog's
    # PollingObserver, for NFS/SMB where the kernel sees no remote changes).
    mode: str = "native"
    # Symbolic links are refused unless allowed; an allowed link is still
    # refused when it resolves outside the inbox root.
    allow_symlinks: bool = False
    # Seconds between two snapshots of the folders in "poll" mode.
    poll_interval: float = 1.0

    def __post_init__(self) -> None:
        for label, folder in (("root", self.root), ("cancel_dir", self.cancel_dir)):
            if not os.path.isabs(folder):
                raise ValueError(f"inbox {self.name!r}: {label} must be an absolute path, got {folder!r}")
        if self.mode not in ("native", "poll"):
            raise ValueError(f"inbox {self.name!r}: mode must be 'native' or 'poll', got {self.mode!r}")
        if not self.poll_interval > 0:
            raise ValueError(f"inbox {self.name!r}: poll_interval must be > 0, got {self.poll_interval!r}")
        # Normalised once so that prefix checks against event paths are exact.
        object.__setattr__(self, "root", os.path.normpath(self.root))
        object.__setattr__(self, "cancel_dir", os.path.normpath(self.cancel_dir))


class Kind(enum.Enum):
    """Which of an inbox's folders a path lies in."""

    INBOX = "inbox"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at a path found."""

    # A regular file (or an allowed link to one) with this identity.
    identity: FileIdentity | None = None
    # Refused: why, and the link's own identity (a rejection is reported once per identity).
    reason: str | None = None
    rejected_identity: FileIdentity | None = None


NOTHING = Look()


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def kind_of(spec: WatchSpec, path: str) -> Kind | None:
    # The cancel folder is checked first in case it lives inside the root.
    if is_within(path, spec.cancel_dir):
        return Kind.CANCEL
    if is_within(path, spec.root):
        return Kind.INBOX
    return None


def folders_of(spec: WatchSpec) -> list[str]:
    """Folders to watch and walk; a cancel folder inside the root comes with it."""
    if is_within(spec.cancel_dir, spec.root):
        return [spec.root]
    return [spec.root, spec.cancel_dir]


def look_at(spec: WatchSpec, kind: Kind, path: str) -> Look:
    try:
        st = os.lstat(path)
    except OSError:
        return NOTHING
    if stat.S_ISLNK(st.st_mode):
        return look_at_link(spec, kind, path, FileIdentity.from_stat(st))
    if not stat.S_ISREG(st.st_mode):
        return NOTHING  # a folder named x.wav is walked instead; fifos and devices never settle
    return Look(identity=FileIdentity.from_stat(st))


def look_at_link(spec: WatchSpec, kind: Kind, path: str, link_identity: FileIdentity) -> Look:
    if not is_candidate_name(path) and not os.path.isfile(path):
        # A link to a folder (or a dangling one) under a non-media name is no
        # file to take or refuse: the walk does not follow it, and a source
        # beneath it is refused when its job opens it (safepath).
        return NOTHING
    if not spec.allow_symlinks:
        return Look(reason=REASON_SYMLINK_REFUSED, rejected_identity=link_identity)
    target = os.path.realpath(path)
    # A link in the cancel folder may name the inbox file it cancels.
    allowed = [spec.root, spec.cancel_dir] if kind is Kind.CANCEL else [spec.root]
    if not any(is_within(target, os.path.realpath(folder)) for folder in allowed):
        return Look(reason=REASON_SYMLINK_OUTSIDE, rejected_identity=link_identity)
    try:
        st = os.stat(target)
    except OSError:
        return NOTHING  # dangling: nothing to settle yet; a rescan looks again
    if not stat.S_ISREG(st.st_mode):
        return NOTHING
    return Look(identity=FileIdentity.from_stat(st))


def walk_files(folder: str) -> Iterator[str]:
    """Every candidate file under folder, without following folder links."""

    def report(error: OSError) -> None:
        # A missing inbox root shows in dead_inboxes(); anything else is worth a line.
        if not (isinstance(error, FileNotFoundError) and error.filename == folder):
            logger.warning("cannot read folder %s: %s", error.filename, error.strerror)

    for dirpath, _dirnames, filenames in os.walk(folder, onerror=report, followlinks=False):
        for name in filenames:
            if is_watched_name(name):
                yield os.path.join(dirpath, name)


def index_specs(specs: Sequence[WatchSpec]) -> dict[str, WatchSpec]:
    """Specs by inbox name; a name listed twice is refused."""
    index: dict[str, WatchSpec] = {}
    for spec in specs:
        if spec.name in index:
            raise ValueError(f"inbox {spec.name!r} is listed twice")
        index[spec.name] = spec
    return index
