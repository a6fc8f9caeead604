"""Crash points: where the crash-recovery tests stop whisperd like a power cut.

The one seam for them (stdlib only). Product code names a point it passes
with `reached(POINT)`; nothing happens unless a test armed that point: the
daemon's hidden `whisperd run --crash-point POINT` reaches the worker through
its settings, and the worker arms it with a crash that SIGKILLs the daemon,
then itself. In-process tests arm a point with a crash of their own (an
exception) to stop an end of an attempt after any step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The worker's own points.
AFTER_CLAIM = "after_claim"
DURING_TRANSCRIPTION = "during_transcription"
AFTER_OUTPUTS = "after_outputs"
# The steps of an attempt's end (lifecycle.py), in order: the point after each.
AFTER_TRANSITION = "after_transition"
AFTER_OUTPUTS_REMOVED = "after_outputs_removed"
AFTER_SOURCE_MOVED = "after_source_moved"
AFTER_NOTE_WRITTEN = "after_note_written"
BEFORE_MARK_DISPOSED = "before_mark_disposed"
END_STEPS = (
    AFTER_TRANSITION,
    AFTER_OUTPUTS_REMOVED,
    AFTER_SOURCE_MOVED,
    AFTER_NOTE_WRITTEN,
    BEFORE_MARK_DISPOSED,
)
# Every point `whisperd run --crash-point` accepts.
ALL = (AFTER_CLAIM, DURING_TRANSCRIPTION, AFTER_OUTPUTS, *END_STEPS)

# The armed point and what happens there: at most one per process.
_ARMED: dict[str, Callable[[], None]] = {}


def arm(point: str, crash: Callable[[], None]) -> None:
    """Run `crash` whenever `point` is reached (until disarmed)."""
    if point not in ALL:
        raise ValueError(f"unknown crash point {point!r}")
    _ARMED.clear()
    _ARMED[point] = crash


def disarm() -> None:
    _ARMED.clear()


@contextmanager
def armed(point: str, crash: Callable[[], None]) -> Iterator[None]:
    """`point` armed for the block (in-process tests)."""
    arm(point, crash)
    try:
        yield
    finally:
        disarm()


def reached(point: str) -> None:
    """Called by product code as it passes `point`."""
    crash = _ARMED.get(point)
    if crash is not None:
        crash()
