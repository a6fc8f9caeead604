"""The watcher's event side: one watchdog
observer per inbox, and the paths its callbacks record for the settle thread.

Watchdog's threads only call ``PendingEvents.record``, which notes the paths
under its own lock and returns; the settle thread drains them. ``Observers``
starts, revives and retires the observers; the watcher calls it under its
state lock only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

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

from whisperd.watch.rules import WatchSpec, folders_of, is_watched_name

# The watcher's logger: its lines keep the name they always had.
logger = logging.getLogger("whisperd.watch.watcher")

# Events that say nothing about a file changing: reading a file opens and closes it.
_IGNORED_EVENT_TYPES = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})
# Directory events worth a walk (new folder) or a forget (folder gone).
_FOLDER_EVENT_TYPES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED})
# How long set_specs and rescans wait for a retired observer's threads.
_OBSERVER_JOIN_SECONDS = 2.0

# What one drain hands the settle thread: file path -> (inbox, event time or
# None for a path that only went away), folder -> inbox, and arrival paths.
Drained = tuple[dict[str, tuple[str, float | None]], dict[str, str], set[str]]


class PendingEvents:
    """Written by watchdog's threads, drained by the settle thread."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, tuple[str, float | None]] = {}  # path -> (inbox, event time)
        self._folders: dict[str, str] = {}  # folder -> inbox
        # Paths a file arrived at (created, or the target of a move): a new
        # drop there, even of a file just moved away and back, which the
        # settle thread may never have seen gone (watchdog reports the move
        # out of a watched folder up to half a second late).
        self._arrivals: set[str] = set()
        self._seen: dict[str, int] = {}

    def record(self, inbox: str, event: FileSystemEvent) -> None:
        """Runs in a watchdog thread: note the paths and return at once."""
        kind = event.event_type
        now = self._clock()
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        with self._lock:
            self._seen[kind] = self._seen.get(kind, 0) + 1
            if kind in _IGNORED_EVENT_TYPES:
                return
            if event.is_directory:
                if kind in _FOLDER_EVENT_TYPES:
                    # The source of a move or delete is looked at too: its files are gone.
                    for folder in (src, dest):
                        if folder:
                            self._folders[folder] = inbox
                return
            # A source that moved away or was deleted is recorded without an
            # activity time: the settle thread only needs to see it gone.
            if dest:
                self._note_file(inbox, src, None)
                self._note_file(inbox, dest, now)
                self._arrivals.add(dest)
            else:
                self._note_file(inbox, src, None if kind == EVENT_TYPE_DELETED else now)
                if kind == EVENT_TYPE_CREATED:
                    self._arrivals.add(src)

    def _note_file(self, inbox: str, path: str, at: float | None) -> None:
        if is_watched_name(path):
            self._files[path] = (inbox, at)

    def drain(self) -> Drained:
        """Everything recorded since the last drain."""
        with self._lock:
            files, folders, arrivals = self._files, self._folders, self._arrivals
            self._files, self._folders, self._arrivals = {}, {}, set()
        return files, folders, arrivals

    def seen(self) -> dict[str, int]:
        """File-system events received so far, by watchdog event type (a copy)."""
        with self._lock:
            return dict(self._seen)


class _EventRecorder(FileSystemEventHandler):
    """Watchdog handler: hands every event to the watcher's recorder and returns."""

    def __init__(self, inbox: str, record: Callable[[str, FileSystemEvent], None]) -> None:
        super().__init__()
        self._inbox = inbox
        self._record = record

    def dispatch(self, event: FileSystemEvent) -> None:
        self._record(self._inbox, event)


class Observers:
    """One watchdog observer per inbox, and those stopped but maybe not yet
    joined. Not locked: the watcher calls it under its state lock."""

    def __init__(self, record: Callable[[str, FileSystemEvent], None]) -> None:
        self._record = record
        self._running: dict[str, BaseObserver] = {}
        self._retired: list[BaseObserver] = []  # stopped, maybe not yet joined

    def start(self, spec: WatchSpec) -> None:
        if not all(os.path.isdir(folder) for folder in (spec.root, spec.cancel_dir)):
            return  # reported by dead_inboxes(); tried again at the next rescan
        observer: BaseObserver = (
            PollingObserver(timeout=spec.poll_interval) if spec.mode == "poll" else Observer()
        )
        observer.name = f"whisperd-watch-{spec.name}"
        handler = _EventRecorder(spec.name, self._record)
        try:
            for folder in folders_of(spec):
                observer.schedule(handler, folder, recursive=True)
            observer.start()
        except OSError as exc:
            logger.warning("cannot watch inbox %s (%s): %s", spec.name, spec.root, exc)
            observer.stop()  # stops any emitter that did start
            return
        self._running[spec.name] = observer

    def stop(self, name: str) -> None:
        observer = self._running.pop(name, None)
        if observer is None:
            return
        observer.stop()
        if observer.is_alive():
            observer.join(_OBSERVER_JOIN_SECONDS)
        if observer.is_alive():
            self._retired.append(observer)

    def revive(self, specs: Mapping[str, WatchSpec]) -> None:
        """Replace every observer that died (or never started)."""
        for name, spec in specs.items():
            if not self.alive(name):
                self.stop(name)
                self.start(spec)

    def alive(self, name: str) -> bool:
        observer = self._running.get(name)
        if observer is None or not observer.is_alive():
            return False
        # An emitter stops on its own when its folder is deleted.
        emitters = list(observer.emitters)
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def retire_all(self) -> None:
        """Stop every observer; join() waits for them."""
        for observer in self._running.values():
            observer.stop()
            self._retired.append(observer)
        self._running.clear()

    def retired(self) -> list[BaseObserver]:
        return list(self._retired)

    def forget_joined(self) -> None:
        self._retired = [o for o in self._retired if o.is_alive()]

    def threads(self) -> list[BaseObserver]:
        """Every observer thread, running or retired."""
        return [*self._running.values(), *self._retired]
