"""The watcher's delivery side: what settled
or was refused, handed to the callbacks in order, outside the watcher's
state lock; with ``on_settled_many``, a run of settled files of one inbox in
one call. A callback that raises is logged and reported back (``on_failed``)
so the watcher offers those files again at the next rescan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from whisperd.jobs import FileIdentity
from whisperd.watch.rules import Kind, WatchSpec

# The watcher's logger: its lines keep the name they always had.
logger = logging.getLogger("whisperd.watch.watcher")

SettledCallback = Callable[[WatchSpec, str, FileIdentity], None]
SettledManyCallback = Callable[[WatchSpec, list[tuple[str, FileIdentity]]], None]
RejectedCallback = Callable[[WatchSpec, str, str], None]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A callback to run once the state lock is released."""

    spec: WatchSpec
    path: str
    kind: Kind
    # The settled identity, or None for a rejection.
    identity: FileIdentity | None = None
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Callbacks:
    """The watcher's callbacks (see watch/watcher.py), run by the settle thread."""

    on_settled: SettledCallback
    on_cancel: SettledCallback
    on_rejected: RejectedCallback
    # When given, replaces on_settled (one call per run of one inbox's files).
    on_settled_many: SettledManyCallback | None
    # Told which deliveries a callback raised on.
    on_failed: Callable[[list[Delivery]], None]

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Run callbacks in order; with on_settled_many, a run of settled
        files of one inbox goes in one call."""
        batch: list[Delivery] = []
        for item in deliveries:
            batchable = self.on_settled_many is not None and item.identity is not None
            batchable = batchable and item.kind is Kind.INBOX
            if batchable and (not batch or batch[0].spec.name == item.spec.name):
                batch.append(item)
                continue
            self._deliver_batch(batch)
            batch = [item] if batchable else []
            if not batchable:
                self._deliver_one(item)
        self._deliver_batch(batch)

    def _deliver_one(self, item: Delivery) -> None:
        """A failure is logged and, for a settled file, forgotten so that the
        next rescan offers it again."""
        try:
            if item.identity is None:
                self.on_rejected(item.spec, item.path, item.reason)
            elif item.kind is Kind.CANCEL:
                self.on_cancel(item.spec, item.path, item.identity)
            else:
                self.on_settled(item.spec, item.path, item.identity)
        except Exception:
            logger.exception("watcher callback failed for %s (inbox %s)", item.path, item.spec.name)
            self.on_failed([item])

    def _deliver_batch(self, batch: list[Delivery]) -> None:
        if not batch or self.on_settled_many is None:
            return
        files = [(item.path, item.identity) for item in batch if item.identity is not None]
        try:
            self.on_settled_many(batch[0].spec, files)
        except Exception:
            inbox = batch[0].spec.name
            logger.exception("watcher callback failed for %d files (inbox %s)", len(files), inbox)
            self.on_failed(batch)
