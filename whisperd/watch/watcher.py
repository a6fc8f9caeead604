"""Inbox folders -> settled candidate files.

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

This module is the settle logic; its parts are ``watch/rules.py`` (names,
WatchSpec, one look at a path), ``watch/observers.py`` (the observers and what
their callbacks record) and ``watch/delivery.py`` (running the callbacks).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from whisperd.jobs import FileIdentity
from whisperd.watch.delivery import (
    Callbacks,
    Delivery,
    RejectedCallback,
    SettledCallback,
    SettledManyCallback,
)
from whisperd.watch.observers import Observers, PendingEvents
from whisperd.watch.rules import (
    Kind,
    WatchSpec,
    folders_of,
    index_specs,
    is_candidate_name,
    is_within,
    kind_of,
    look_at,
    unsupported_reason,
    walk_files,
)

logger = logging.getLogger(__name__)

# The settle thread wakes at most this often, and at least four times per settle period.
_MAX_TICK_SECONDS = 0.2
_MIN_TICK_SECONDS = 0.05


@dataclass(slots=True)
class _Candidate:
    """A path the settle thread is watching until it stops changing."""

    inbox: str
    kind: Kind
    # Identity at the last look; None until the first look.
    identity: FileIdentity | None
    # Clock time since which the identity has not changed (or the last activity event).
    since: float


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
        _check_periods(settle_seconds=settle_seconds, rescan_seconds=rescan_seconds)
        self._settle_seconds = settle_seconds
        self._rescan_seconds = rescan_seconds
        self._callbacks = Callbacks(
            on_settled=on_settled,
            on_settled_many=on_settled_many,
            on_cancel=on_cancel,
            on_rejected=on_rejected,
            on_failed=self._forget_delivered,
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._tick = min(_MAX_TICK_SECONDS, max(_MIN_TICK_SECONDS, settle_seconds / 4))

        # Written by watchdog threads, drained by the settle thread.
        self._pending = PendingEvents(clock)

        # Everything below is guarded by _state_lock (settle thread, rescan, set_specs).
        self._state_lock = threading.RLock()
        self._specs: dict[str, WatchSpec] = index_specs(specs)
        self._tracking: dict[str, _Candidate] = {}
        self._delivered: dict[str, FileIdentity] = {}
        self._rejected: dict[str, FileIdentity] = {}
        self._observers = Observers(self._pending.record)
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
                    self._observers.start(spec)
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
            self._observers.retire_all()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the settle thread and stopped observers to end (all within timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._state_lock:
            retired = self._observers.retired()
        for observer in retired:
            if observer.is_alive():
                observer.join(remaining())
        if self._thread is not None:
            self._thread.join(remaining())
        with self._state_lock:
            self._observers.forget_joined()
        if self.is_alive():
            logger.warning("watcher threads still running after %.1f s", timeout or 0.0)

    def is_alive(self) -> bool:
        """True while the settle thread or any observer thread runs."""
        with self._state_lock:
            observers = self._observers.threads()
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
        return self._pending.seen()

    def wait_start_settled(self, timeout: float) -> bool:
        """Wait up to timeout seconds until every file the start-up scan found
        has been handed to a callback, or has changed since (still being
        written, so nobody is waiting for it yet). True when that happened."""
        return self._start_settled.wait(timeout)

    def dead_inboxes(self) -> list[str]:
        """Inboxes whose folder is missing or whose observer died, sorted by name."""
        with self._state_lock:
            return sorted(name for name, spec in self._specs.items() if not self._is_healthy(spec))

    # ----------------------------------------------------------------- settling

    def step(self, now: float | None = None) -> None:
        """One iteration of the settle loop: take recorded paths, look at every
        tracked path once, deliver those that have settled."""
        now = self._clock() if now is None else now
        with self._state_lock:
            files, folders, arrivals = self._pending.drain()
            for path in arrivals:
                self._delivered.pop(path, None)  # whatever was there before, this is a new drop
            for folder, inbox in folders.items():
                self._take_folder(inbox, folder, now)
            for path, (inbox, at) in files.items():
                self._take_path(inbox, path, at, now)
            deliveries = self._settle_tracked(now)
        self._callbacks.deliver(deliveries)
        self._note_start_progress()

    def _take_folder(self, inbox: str, folder: str, now: float) -> None:
        spec = self._specs.get(inbox)
        if spec is None or kind_of(spec, folder) is None:
            return
        if not os.path.isdir(folder) or os.path.islink(folder):
            self._forget_under(folder)
            return
        for path in walk_files(folder):
            self._take_path(inbox, path, None, now)

    def _take_path(self, inbox: str, path: str, at: float | None, now: float) -> None:
        spec = self._specs.get(inbox)
        kind = None if spec is None else kind_of(spec, path)
        if kind is None or (kind is Kind.CANCEL and not is_candidate_name(path)):
            return
        candidate = self._tracking.get(path)
        if candidate is None or candidate.inbox != inbox or candidate.kind is not kind:
            self._tracking[path] = _Candidate(inbox=inbox, kind=kind, identity=None, since=now)
        elif at is not None:
            # An event is evidence of activity even when a coarse mtime hides it.
            candidate.since = max(candidate.since, at)

    def _settle_tracked(self, now: float) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for path, candidate in list(self._tracking.items()):
            spec = self._specs.get(candidate.inbox)
            if spec is None:
                del self._tracking[path]
                continue
            look = look_at(spec, candidate.kind, path)
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
                if not (candidate.kind is Kind.CANCEL and self._unchanged_for_settle(look.identity)):
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

    def _settled(self, spec: WatchSpec, kind: Kind, path: str, identity: FileIdentity) -> list[Delivery]:
        if self._delivered.get(path) == identity:
            return []  # same file, same content: already handed over
        self._delivered[path] = identity
        unsupported = unsupported_reason(path)
        if unsupported is not None:
            return [Delivery(spec=spec, path=path, kind=kind, reason=unsupported)]
        return [Delivery(spec=spec, path=path, kind=kind, identity=identity)]

    def _reject(self, spec: WatchSpec, path: str, reason: str, identity: FileIdentity) -> list[Delivery]:
        if self._rejected.get(path) == identity:
            return []
        self._rejected[path] = identity
        return [Delivery(spec=spec, path=path, kind=Kind.INBOX, reason=reason)]

    def _forget_delivered(self, items: list[Delivery]) -> None:
        """A callback failed: forget those files were handed over, so the next rescan offers them again."""
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
            for path in [p for p in table if is_within(p, folder)]:
                del table[path]

    # ----------------------------------------------------------------- rescans

    def rescan(self) -> None:
        """Walk every inbox and cancel folder and track every candidate found
        that is new or changed; forget paths that are gone; revive observers
        that died (folders are never created here)."""
        now = self._clock()
        with self._state_lock:
            if self._observers_expected():
                self._observers.revive(self._specs)
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
        for folder in folders_of(spec):
            for path in walk_files(folder):
                found.add(path)
                if path not in self._tracking and self._changed_since_handled(spec, path):
                    self._take_path(spec.name, path, None, now)
        return found

    def _changed_since_handled(self, spec: WatchSpec, path: str) -> bool:
        kind = kind_of(spec, path)
        if kind is None:
            return False
        look = look_at(spec, kind, path)
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

    def _is_healthy(self, spec: WatchSpec) -> bool:
        return self._why_dead(spec) == ""

    def _why_dead(self, spec: WatchSpec) -> str:
        for folder in (spec.root, spec.cancel_dir):
            if not os.path.isdir(folder):
                return f"folder {folder} is missing"
        if self._observers_expected() and not self._observers.alive(spec.name):
            return "its file-system observer stopped"
        return ""

    def _observers_expected(self) -> bool:
        return self._started and self._observe and not self._stop_event.is_set()

    # ----------------------------------------------------------------- reload

    def set_specs(self, specs: Sequence[WatchSpec]) -> None:
        """Reload: start watching new or changed inboxes, stop removed ones,
        leave unchanged ones alone (their settle state included)."""
        new = index_specs(specs)
        now = self._clock()
        with self._state_lock:
            old = self._specs
            for name in [n for n in old if new.get(n) != old[n]]:
                self._observers.stop(name)
                self._reported_dead.discard(name)
            added = [spec for name, spec in new.items() if old.get(name) != spec]
            self._specs = new
            self._drop_uncovered()
            if not self._started or self._stop_event.is_set():
                return
            for spec in added:
                if self._observe:
                    self._observers.start(spec)
                self._scan(spec, now)

    def _drop_uncovered(self) -> None:
        for path, candidate in list(self._tracking.items()):
            spec = self._specs.get(candidate.inbox)
            if spec is None or kind_of(spec, path) is not candidate.kind:
                del self._tracking[path]
        for table in (self._delivered, self._rejected):
            for path in [p for p in table if not self._covered(p)]:
                del table[path]

    def _covered(self, path: str) -> bool:
        return any(kind_of(spec, path) is not None for spec in self._specs.values())


def _check_periods(**periods: float) -> None:
    for name, seconds in periods.items():
        if seconds < 0:
            raise ValueError(f"{name} must be >= 0, got {seconds!r}")
