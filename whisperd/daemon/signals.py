"""The daemon's signals: SIGTERM / SIGINT ask
it to stop (a second one: at once), SIGHUP to reload. Handlers only set
events; the daemon's loop acts on them, and the nudge wakes it at once.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from types import FrameType


@dataclass(frozen=True)
class Signals:
    """What the handlers (and other threads) set, and the loop reads."""

    stop: threading.Event = field(default_factory=threading.Event)
    force: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)
    # Set with each of the others and by a store notice: the loop runs at once.
    nudge: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        if self.stop.is_set():
            self.force.set()  # a second SIGTERM: stop at once
        self.stop.set()
        self.nudge.set()

    def request_reload(self) -> None:
        self.reload.set()
        self.nudge.set()

    def install(self) -> None:
        """Route SIGTERM, SIGINT and SIGHUP here (main thread only)."""

        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
