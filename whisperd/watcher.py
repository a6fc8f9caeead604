"""Inbox folders -> settled candidate files (layer L2).

The watcher turns file-system activity into three kinds of callback:

- ``on_settled(spec, path, identity)``: a media file in an inbox has stopped
  changing (size and mtime unchanged for ``settle_seconds``); or, when
  ``on_settled_many`` is given, ``on_settled_many(spec, [(path, identity), ...])``
  with every file of one inbox that settled in the same step;
- ``on_cancel(spec, path, identity)``: the same, for a file in the inbox's
  cancel folder; a file that arrives there with an mtime already
  ``settle_seconds`` old (moved from the inbox, or copied with ``cp -p``) is
  delivered at first sight: it settled in the inbox, and a cancel should not
  wait for it twice;
- ``on_rejected(spec, path, reason)``: a file the inbox refuses (symbolic
  links; a settled file with an extension not in MEDIA_EXTENSIONS, once per identity).

It never touches the job store; the daemon wires the callbacks to it. Delivery
is at-least-once: the job store is idempotent, and the watcher only remembers
enough (the identity delivered per path) to keep duplicates rare.

Threads: watchdog observers (one per inbox) whose handlers only record a path
and return, and one settle thread that owns every decision. Both are owned by
``Watcher`` (start / stop / join).
"""

from __future__ import annotations

import enum
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from whisperd.jobs import FileIdentity

logger = logging.getLogger(__name__)

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

# Events that say nothing about a file changing: reading a file opens and closes it.
_IGNORED_EVENT_TYPES = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})
# Directory events worth a walk (new folder) or a forget (folder gone).
_FOLDER_EVENT_TYPES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED})

# The settle thread wakes at most this often, and at least four times per settle period.
_MAX_TICK_SECONDS = 0.2
_MIN_TICK_SECONDS = 0.05
# How long set_specs and rescans wait for a retired observer's threads.
_OBSERVER_JOIN_SECONDS = 2.0


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


def _is_watched_name(name: str) -> bool:
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


SettledCallback = Callable[[WatchSpec, str, FileIdentity], None]
SettledManyCallback = Callable[[WatchSpec, list[tuple[str, FileIdentity]]], None]
RejectedCallback = Callable[[WatchSpec, str, str], None]


class _Kind(enum.Enum):
    INBOX = "inbox"
    CANCEL = "cancel"


@dataclass(slots=True)
class _Candidate:
    """A path the settle thread is watching until it stops changing."""

    inbox: str
    kind: _Kind
    # Identity at the last look; None until the first look.
    identity: FileIdentity | None
    # Clock time since which the identity has not changed (or the last activity event).
    since: float


@dataclass(frozen=True, slots=True)
class _Look:
    """What one look at a path found."""

    # A regular file (or an allowed link to one) with this identity.
    identity: FileIdentity | None = None
    # Refused: why, and the link's own identity (a rejection is reported once per identity).
    reason: str | None = None
    rejected_identity: FileIdentity | None = None


_NOTHING = _Look()


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _kind_of(spec: WatchSpec, path: str) -> _Kind | None:
    # The cancel folder is checked first in case it lives inside the root.
    if _is_within(path, spec.cancel_dir):
        return _Kind.CANCEL
    if _is_within(path, spec.root):
        return _Kind.INBOX
    return None


def _folders_of(spec: WatchSpec) -> list[str]:
    """Folders to watch and walk; a cancel folder inside the root comes with it."""
    if _is_within(spec.cancel_dir, spec.root):
        return [spec.root]
    return [spec.root, spec.cancel_dir]


def _look_at(spec: WatchSpec, kind: _Kind, path: str) -> _Look:
    try:
        st = os.lstat(path)
    except OSError:
        return _NOTHING
    if stat.S_ISLNK(st.st_mode):
        return _look_at_link(spec, kind, path, FileIdentity.from_stat(st))
    if not stat.S_ISREG(st.st_mode):
        return _NOTHING  # a folder named x.wav is walked instead; fifos and devices never settle
    return _Look(identity=FileIdentity.from_stat(st))


def _look_at_link(spec: WatchSpec, kind: _Kind, path: str, link_identity: FileIdentity) -> _Look:
    if not is_candidate_name(path) and not os.path.isfile(path):
        # A link to a folder (or a dangling one) under a non-media name is no
        # file to take or refuse: the walk does not follow it, and a source
        # beneath it is refused when its job opens it (safepath).
        return _NOTHING
    if not spec.allow_symlinks:
        return _Look(reason=REASON_SYMLINK_REFUSED, rejected_identity=link_identity)
    target = os.path.realpath(path)
    # A link in the cancel folder may name the inbox file it cancels.
    allowed = [spec.root, spec.cancel_dir] if kind is _Kind.CANCEL else [spec.root]
    if not any(_is_within(target, os.path.realpath(folder)) for folder in allowed):
        return _Look(reason=REASON_SYMLINK_OUTSIDE, rejected_identity=link_identity)
    try:
        st = os.stat(target)
    except OSError:
        return _NOTHING  # dangling: nothing to settle yet; a rescan looks again
    if not stat.S_ISREG(st.st_mode):
        return _NOTHING
    return _Look(identity=FileIdentity.from_stat(st))


def _walk_files(folder: str) -> Iterator[str]:
    """Every candidate file under folder, without following folder links."""

    def report(error: OSError) -> None:
        # A missing inbox root shows in dead_inboxes(); anything else is worth a line.
        if not (isinstance(error, FileNotFoundError) and error.filename == folder):
            logger.warning("cannot read folder %s: %s", error.filename, error.strerror)

    for dirpath, _dirnames, filenames in os.walk(folder, onerror=report, followlinks=False):
        for name in filenames:
            if _is_watched_name(name):
                yield os.path.join(dirpath, name)


class _EventRecorder(FileSystemEventHandler):
    """Watchdog handler: hands every event to the watcher's recorder and returns."""

    def __init__(self, inbox: str, record: Callable[[str, FileSystemEvent], None]) -> None:
        super().__init__()
        self._inbox = inbox
        self._record = record

    def dispatch(self, event: FileSystemEvent) -> None:
        self._record(self._inbox, event)


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A callback to run once the state lock is released."""

    spec: WatchSpec
    path: str
    kind: _Kind
    # The settled identity, or None for a rejection.
    identity: FileIdentity | None = None
    reason: str = ""


class Watcher:
    """Owns one watchdog observer per inbox and the settle thread.

    ``settle_seconds``: how long size and mtime must stay unchanged before a file
    is delivered. ``rescan_seconds``: period of the full walk that catches events
    the kernel dropped and revives dead observers (0 disables it). ``clock`` is
    the monotonic time source used for settling and rescans; ``wall_clock`` the
    time that mtimes are compared with (cancel folder). ``on_settled_many``,
    when given, replaces ``on_settled``: files of one inbox that settle in the
    same step are handed over in one call, so that a thousand files dropped
    at once can be queued in one transaction instead of a thousand.
    """

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        *,
        settle_seconds: float,
        rescan_seconds: float,
        on_settled: SettledCallback,
        on_cancel: SettledCallback,
        on_rejected: RejectedCallback,
        clock: Callable[[], float] = time.monotonic,
        on_settled_many: SettledManyCallback | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if settle_seconds < 0:
            raise ValueError(f"settle_seconds must be >= 0, got {settle_seconds!r}")
        if rescan_seconds < 0:
            raise ValueError(f"rescan_seconds must be >= 0, got {rescan_seconds!r}")
        self._settle_seconds = settle_seconds
        self._rescan_seconds = rescan_seconds
        self._on_settled = on_settled
        self._on_settled_many = on_settled_many
        self._on_cancel = on_cancel
        self._on_rejected = on_rejected
        self._clock = clock
        self._wall_clock = wall_clock
        self._tick = min(_MAX_TICK_SECONDS, max(_MIN_TICK_SECONDS, settle_seconds / 4))

        # Written by watchdog threads, drained by the settle thread.
        self._pending_lock = threading.Lock()
        self._pending_files: dict[str, tuple[str, float | None]] = {}  # path -> (inbox, event time)
        self._pending_folders: dict[str, str] = {}  # folder -> inbox
        # Paths a file arrived at (created, or the target of a move): a new
        # drop there, even of a file just moved away and back, which the
        # settle thread may never have seen gone (watchdog reports the move
        # out of a watched folder up to half a second late).
        self._pending_arrivals: set[str] = set()
        self._events_seen: dict[str, int] = {}

        # Everything below is guarded by _state_lock (settle thread, rescan, set_specs).
        self._state_lock = threading.RLock()
        self._specs: dict[str, WatchSpec] = _index_specs(specs)
        self._tracking: dict[str, _Candidate] = {}
        self._delivered: dict[str, FileIdentity] = {}
        self._rejected: dict[str, FileIdentity] = {}
        self._observers: dict[str, BaseObserver] = {}
        self._retired: list[BaseObserver] = []  # stopped, maybe not yet joined
        self._reported_dead: set[str] = set()
        self._last_rescan: float | None = None
        # Paths the start-up scan found that are neither handed over nor seen
        # changing since; _start_settled is set once none is left.
        self._start_backlog: set[str] = set()
        self._start_settled = threading.Event()

        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._observe = True

    # ----------------------------------------------------------------- lifecycle

    def start(self, *, observe: bool = True, run_loop: bool = True) -> None:
        """Start the observers, scan every inbox, then start the settle thread.

        Observers come first so that a file dropped during the initial scan is
        seen by one or the other. ``observe=False`` runs without observers
        (rescans only) and ``run_loop=False`` without the settle thread, so
        that tests can drive ``step()`` and ``rescan()`` themselves.
        """
        if self._started:
            raise RuntimeError("watcher already started")
        self._started = True
        self._observe = observe
        with self._state_lock:
            if observe:
                for spec in self._specs.values():
                    self._start_observer(spec)
        self.rescan()
        with self._state_lock:
            self._start_backlog = set(self._tracking)
        self._note_start_progress()
        if run_loop:
            self._thread = threading.Thread(target=self._run, name="whisperd-watcher-settle", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observers and the settle thread, waiting up to timeout seconds."""
        self._stop_event.set()
        self._start_settled.set()  # nobody waits for a stopped watcher
        with self._state_lock:
            for observer in self._observers.values():
                self._retire(observer)
            self._observers.clear()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the settle thread and stopped observers to end (all within timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._state_lock:
            retired = list(self._retired)
        for observer in retired:
            if observer.is_alive():
                observer.join(remaining())
        if self._thread is not None:
            self._thread.join(remaining())
        with self._state_lock:
            self._retired = [o for o in self._retired if o.is_alive()]
        if self.is_alive():
            logger.warning("watcher threads still running after %.1f s", timeout or 0.0)

    def is_alive(self) -> bool:
        """True while the settle thread or any observer thread runs."""
        with self._state_lock:
            observers = [*self._observers.values(), *self._retired]
        thread_alive = self._thread is not None and self._thread.is_alive()
        return thread_alive or any(o.is_alive() for o in observers)

    def _run(self) -> None:
        next_rescan = self._clock() + self._rescan_seconds
        while not self._stop_event.wait(self._tick):
            now = self._clock()
            try:
                if self._rescan_seconds > 0 and now >= next_rescan:
                    self.rescan()
                    next_rescan = now + self._rescan_seconds
                self.step(now)
            except Exception:
                logger.exception("watcher settle loop failed; carrying on")

    # ----------------------------------------------------------------- public state

    @property
    def last_rescan(self) -> float | None:
        """Clock time of the last completed rescan (None before the first)."""
        with self._state_lock:
            return self._last_rescan

    @property
    def events_seen(self) -> dict[str, int]:
        """File-system events received so far, by watchdog event type (a copy)."""
        with self._pending_lock:
            return dict(self._events_seen)

    def wait_start_settled(self, timeout: float) -> bool:
        """Wait up to timeout seconds until every file the start-up scan found
        has been handed to a callback, or has changed since (still being
        written, so nobody is waiting for it yet). True when that happened."""
        return self._start_settled.wait(timeout)

    def dead_inboxes(self) -> list[str]:
        """Inboxes whose folder is missing or whose observer died, sorted by name."""
        with self._state_lock:
            return sorted(name for name, spec in self._specs.items() if not self._is_healthy(spec))

    # ----------------------------------------------------------------- event side

    def _record_event(self, inbox: str, event: FileSystemEvent) -> None:
        """Runs in a watchdog thread: note the paths and return at once."""
        kind = event.event_type
        now = self._clock()
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        with self._pending_lock:
            self._events_seen[kind] = self._events_seen.get(kind, 0) + 1
            if kind in _IGNORED_EVENT_TYPES:
                return
            if event.is_directory:
                if kind in _FOLDER_EVENT_TYPES:
                    # The source of a move or delete is looked at too: its files are gone.
                    for folder in (src, dest):
                        if folder:
                            self._pending_folders[folder] = inbox
                return
            # A source that moved away or was deleted is recorded without an
            # activity time: the settle thread only needs to see it gone.
            if dest:
                self._note_file(inbox, src, None)
                self._note_file(inbox, dest, now)
                self._pending_arrivals.add(dest)
            else:
                self._note_file(inbox, src, None if kind == EVENT_TYPE_DELETED else now)
                if kind == EVENT_TYPE_CREATED:
                    self._pending_arrivals.add(src)

    def _note_file(self, inbox: str, path: str, at: float | None) -> None:
        if _is_watched_name(path):
            self._pending_files[path] = (inbox, at)

    def _drain_pending(self) -> tuple[dict[str, tuple[str, float | None]], dict[str, str], set[str]]:
        with self._pending_lock:
            files, folders, arrivals = self._pending_files, self._pending_folders, self._pending_arrivals
            self._pending_files, self._pending_folders, self._pending_arrivals = {}, {}, set()
        return files, folders, arrivals

    # ----------------------------------------------------------------- settling

    def step(self, now: float | None = None) -> None:
        """One iteration of the settle loop: take recorded paths, look at every
        tracked path once, deliver those that have settled."""
        now = self._clock() if now is None else now
        with self._state_lock:
            files, folders, arrivals = self._drain_pending()
            for path in arrivals:
                self._delivered.pop(path, None)  # whatever was there before, this is a new drop
            for folder, inbox in folders.items():
                self._take_folder(inbox, folder, now)
            for path, (inbox, at) in files.items():
                self._take_path(inbox, path, at, now)
            deliveries = self._settle_tracked(now)
        self._deliver(deliveries)
        self._note_start_progress()

    def _take_folder(self, inbox: str, folder: str, now: float) -> None:
        spec = self._specs.get(inbox)
        if spec is None or _kind_of(spec, folder) is None:
            return
        if not os.path.isdir(folder) or os.path.islink(folder):
            self._forget_under(folder)
            return
        for path in _walk_files(folder):
            self._take_path(inbox, path, None, now)

    def _take_path(self, inbox: str, path: str, at: float | None, now: float) -> None:
        spec = self._specs.get(inbox)
        kind = None if spec is None else _kind_of(spec, path)
        if kind is None or (kind is _Kind.CANCEL and not is_candidate_name(path)):
            return
        candidate = self._tracking.get(path)
        if candidate is None or candidate.inbox != inbox or candidate.kind is not kind:
            self._tracking[path] = _Candidate(inbox=inbox, kind=kind, identity=None, since=now)
        elif at is not None:
            # An event is evidence of activity even when a coarse mtime hides it.
            candidate.since = max(candidate.since, at)

    def _settle_tracked(self, now: float) -> list[_Delivery]:
        deliveries: list[_Delivery] = []
        for path, candidate in list(self._tracking.items()):
            spec = self._specs.get(candidate.inbox)
            if spec is None:
                del self._tracking[path]
                continue
            look = _look_at(spec, candidate.kind, path)
            if look.identity is None:
                del self._tracking[path]
                self._delivered.pop(path, None)
                if look.reason is not None and look.rejected_identity is not None:
                    deliveries.extend(self._reject(spec, path, look.reason, look.rejected_identity))
                else:
                    self._rejected.pop(path, None)
                continue
            self._rejected.pop(path, None)
            if candidate.identity != look.identity:
                if candidate.identity is not None:
                    self._start_backlog.discard(path)  # still being written
                candidate.identity = look.identity
                candidate.since = now
                if not (candidate.kind is _Kind.CANCEL and self._unchanged_for_settle(look.identity)):
                    continue
            elif now - candidate.since < self._settle_seconds:
                continue
            del self._tracking[path]
            deliveries.extend(self._settled(spec, candidate.kind, path, look.identity))
        return deliveries

    def _unchanged_for_settle(self, identity: FileIdentity) -> bool:
        """True when the file's own mtime is settle_seconds old: nothing wrote
        to it since, so one look is enough (a move keeps the mtime, and a copy
        that keeps it sets it only once the data is written)."""
        return identity.mtime_ns / 1e9 <= self._wall_clock() - self._settle_seconds

    def _settled(self, spec: WatchSpec, kind: _Kind, path: str, identity: FileIdentity) -> list[_Delivery]:
        if self._delivered.get(path) == identity:
            return []  # same file, same content: already handed over
        self._delivered[path] = identity
        unsupported = unsupported_reason(path)
        if unsupported is not None:
            return [_Delivery(spec=spec, path=path, kind=kind, reason=unsupported)]
        return [_Delivery(spec=spec, path=path, kind=kind, identity=identity)]

    def _reject(self, spec: WatchSpec, path: str, reason: str, identity: FileIdentity) -> list[_Delivery]:
        if self._rejected.get(path) == identity:
            return []
        self._rejected[path] = identity
        return [_Delivery(spec=spec, path=path, kind=_Kind.INBOX, reason=reason)]

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        """Run callbacks outside the state lock, in order; with on_settled_many,
        a run of settled files of one inbox goes in one call."""
        batch: list[_Delivery] = []
        for item in deliveries:
            batchable = self._on_settled_many is not None and item.identity is not None
            batchable = batchable and item.kind is _Kind.INBOX
            if batchable and (not batch or batch[0].spec.name == item.spec.name):
                batch.append(item)
                continue
            self._deliver_batch(batch)
            batch = [item] if batchable else []
            if not batchable:
                self._deliver_one(item)
        self._deliver_batch(batch)

    def _deliver_one(self, item: _Delivery) -> None:
        """A failure is logged and, for a settled file, forgotten so that the
        next rescan offers it again."""
        try:
            if item.identity is None:
                self._on_rejected(item.spec, item.path, item.reason)
            elif item.kind is _Kind.CANCEL:
                self._on_cancel(item.spec, item.path, item.identity)
            else:
                self._on_settled(item.spec, item.path, item.identity)
        except Exception:
            logger.exception("watcher callback failed for %s (inbox %s)", item.path, item.spec.name)
            self._forget_delivered([item])

    def _deliver_batch(self, batch: list[_Delivery]) -> None:
        if not batch or self._on_settled_many is None:
            return
        files = [(item.path, item.identity) for item in batch if item.identity is not None]
        try:
            self._on_settled_many(batch[0].spec, files)
        except Exception:
            inbox = batch[0].spec.name
            logger.exception("watcher callback failed for %d files (inbox %s)", len(files), inbox)
            self._forget_delivered(batch)

    def _forget_delivered(self, items: list[_Delivery]) -> None:
        with self._state_lock:
            for item in items:
                if item.identity is not None and self._delivered.get(item.path) == item.identity:
                    del self._delivered[item.path]

    def _note_start_progress(self) -> None:
        """Runs after callbacks returned, so a handed-over file is a job by now."""
        if not self._started or self._start_settled.is_set():
            return
        with self._state_lock:
            self._start_backlog &= self._tracking.keys()
            if not self._start_backlog:
                self._start_settled.set()

    def _forget_under(self, folder: str) -> None:
        for table in (self._delivered, self._rejected):
            for path in [p for p in table if _is_within(p, folder)]:
                del table[path]

    # ----------------------------------------------------------------- rescans

    def rescan(self) -> None:
        """Walk every inbox and cancel folder and track every candidate found
        that is new or changed; forget paths that are gone; revive observers
        that died (folders are never created here)."""
        now = self._clock()
        with self._state_lock:
            if self._observers_expected():
                self._revive_observers()
            found: set[str] = set()
            for spec in self._specs.values():
                found |= self._scan(spec, now)
            for table in (self._delivered, self._rejected):
                for path in [p for p in table if p not in found]:
                    del table[path]
            self._report_dead()
            self._last_rescan = self._clock()

    def _scan(self, spec: WatchSpec, now: float) -> set[str]:
        found: set[str] = set()
        for folder in _folders_of(spec):
            for path in _walk_files(folder):
                found.add(path)
                if path not in self._tracking and self._changed_since_handled(spec, path):
                    self._take_path(spec.name, path, None, now)
        return found

    def _changed_since_handled(self, spec: WatchSpec, path: str) -> bool:
        kind = _kind_of(spec, path)
        if kind is None:
            return False
        look = _look_at(spec, kind, path)
        if look.identity is not None:
            return self._delivered.get(path) != look.identity
        if look.rejected_identity is not None:
            return self._rejected.get(path) != look.rejected_identity
        return False

    def _report_dead(self) -> None:
        for name, spec in self._specs.items():
            healthy = self._is_healthy(spec)
            if not healthy and name not in self._reported_dead:
                logger.warning("inbox %s is not watched: %s", name, self._why_dead(spec))
                self._reported_dead.add(name)
            elif healthy and name in self._reported_dead:
                logger.info("inbox %s is watched again", name)
                self._reported_dead.discard(name)

    # ----------------------------------------------------------------- observers

    def _start_observer(self, spec: WatchSpec) -> None:
        if not all(os.path.isdir(folder) for folder in (spec.root, spec.cancel_dir)):
            return  # reported by dead_inboxes(); tried again at the next rescan
        observer: BaseObserver = (
            PollingObserver(timeout=spec.poll_interval) if spec.mode == "poll" else Observer()
        )
        observer.name = f"whisperd-watch-{spec.name}"
        handler = _EventRecorder(spec.name, self._record_event)
        try:
            for folder in _folders_of(spec):
                observer.schedule(handler, folder, recursive=True)
            observer.start()
        except OSError as exc:
            logger.warning("cannot watch inbox %s (%s): %s", spec.name, spec.root, exc)
            observer.stop()  # stops any emitter that did start
            return
        self._observers[spec.name] = observer

    def _retire(self, observer: BaseObserver) -> None:
        observer.stop()
        self._retired.append(observer)

    def _stop_observer(self, name: str) -> None:
        observer = self._observers.pop(name, None)
        if observer is None:
            return
        observer.stop()
        if observer.is_alive():
            observer.join(_OBSERVER_JOIN_SECONDS)
        if observer.is_alive():
            self._retired.append(observer)

    def _revive_observers(self) -> None:
        for name, spec in self._specs.items():
            if not self._observer_alive(name):
                self._stop_observer(name)
                self._start_observer(spec)

    def _observer_alive(self, name: str) -> bool:
        observer = self._observers.get(name)
        if observer is None or not observer.is_alive():
            return False
        # An emitter stops on its own when its folder is deleted.
        emitters = list(observer.emitters)
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def _is_healthy(self, spec: WatchSpec) -> bool:
        return self._why_dead(spec) == ""

    def _why_dead(self, spec: WatchSpec) -> str:
        for folder in (spec.root, spec.cancel_dir):
            if not os.path.isdir(folder):
                return f"folder {folder} is missing"
        if self._observers_expected() and not self._observer_alive(spec.name):
            return "its file-system observer stopped"
        return ""

    def _observers_expected(self) -> bool:
        return self._started and self._observe and not self._stop_event.is_set()

    # ----------------------------------------------------------------- reload

    def set_specs(self, specs: Sequence[WatchSpec]) -> None:
        """Reload: start watching new or changed inboxes, stop removed ones,
        leave unchanged ones alone (their settle state included)."""
        new = _index_specs(specs)
        now = self._clock()
        with self._state_lock:
            old = self._specs
            for name in [n for n in old if new.get(n) != old[n]]:
                self._stop_observer(name)
                self._reported_dead.discard(name)
            added = [spec for name, spec in new.items() if old.get(name) != spec]
            self._specs = new
            self._drop_uncovered()
            if not self._started or self._stop_event.is_set():
                return
            for spec in added:
                if self._observe:
                    self._start_observer(spec)
                self._scan(spec, now)

    def _drop_uncovered(self) -> None:
        for path, candidate in list(self._tracking.items()):
            spec = self._specs.get(candidate.inbox)
            if spec is None or _kind_of(spec, path) is not candidate.kind:
                del self._tracking[path]
        for table in (self._delivered, self._rejected):
            for path in [p for p in table if not self._covered(p)]:
                del table[path]

    def _covered(self, path: str) -> bool:
        return any(_kind_of(spec, path) is not None for spec in self._specs.values())


def _index_specs(specs: Sequence[WatchSpec]) -> dict[str, WatchSpec]:
    index: dict[str, WatchSpec] = {}
    for spec in specs:
        if spec.name in index:
            raise ValueError(f"inbox {spec.name!r} is listed twice")
        index[spec.name] = spec
    return index
