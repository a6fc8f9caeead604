"""`whisperd reload`: SIGHUP the running daemon and wait until it has reloaded;
and the daemon's side of a reload: which changed settings it cannot apply.

systemd's Type=notify-reload (which makes `systemctl reload` wait for the
daemon's READY=1) needs systemd >= 253; the unit keeps Type=notify and runs
`whisperd reload` as ExecReload instead, so `systemctl reload` returns only
once the new config is in force (or was refused). The daemon counts finished
reloads in STATE_DIR/reloads; this command reads the count, signals the pid
in STATE_DIR/whisperd.lock and waits for the count to move.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import time

from whisperd import logs
from whisperd.config import Config
from whisperd.files import atomic as atomic_files

# The daemon's logger: a reload's lines keep the name they always had.
log = logs.get_logger("whisperd.daemon.root")

COUNT_FILE = "reloads"
LOCK_FILE = "whisperd.lock"
# Settings a reload applies at once (to jobs queued from then on). Every other
# setting outside the [[inbox]] tables takes effect at the next restart.
RELOADABLE_SETTINGS = frozenset(
    {
        "daemon.shutdown_grace_seconds",
        "daemon.keep_finished_days",
        "daemon.keep_finished_jobs",
        "models.default",
        "workers.max_attempts",
    }
)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Dotted names of changed settings that a reload cannot apply."""
    changed = []
    for section in ("daemon", "models", "workers", "metrics"):
        before, after = getattr(old, section), getattr(new, section)
        for setting in dataclasses.fields(before):
            key = f"{section}.{setting.name}"
            same = getattr(before, setting.name) == getattr(after, setting.name)
            if not same and key not in RELOADABLE_SETTINGS:
                changed.append(key)
    return changed


def report_restart_needed(pending: list[str]) -> None:
    """After a reload: warn of the changed settings it could not apply."""
    if pending:
        log.warning(
            "config.restart_needed", settings=pending, hint="these changes take effect at the next restart"
        )


def reload_count(state_dir: str) -> int:
    """Reloads the running daemon has finished (0: none, or no file)."""
    try:
        with open(os.path.join(state_dir, COUNT_FILE), encoding="utf-8") as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def note_reloaded(state_dir: str) -> None:
    """Called by the daemon when a reload is done (applied or refused)."""
    count = f"{reload_count(state_dir) + 1}\n".encode()
    atomic_files.write_stream_atomic(os.path.join(state_dir, COUNT_FILE), atomic_files.bytes_writer(count))


def daemon_pid(state_dir: str) -> int | None:
    """The pid of the daemon holding the state folder's lock; None when no
    daemon holds it (a pid left in the file by a dead one is never signalled)."""
    try:
        with open(os.path.join(state_dir, LOCK_FILE), encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return int(handle.read().strip())
            return None  # we got the lock: nobody holds it
    except (OSError, ValueError):
        return None


def reload_and_wait(state_dir: str, timeout: float) -> str | None:
    """SIGHUP the daemon owning state_dir; wait until it says the reload is
    done. Returns None on success, else what went wrong."""
    pid = daemon_pid(state_dir)
    if pid is None:
        return f"{os.path.join(state_dir, LOCK_FILE)}: no running daemon recorded there"
    before = reload_count(state_dir)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return f"cannot signal whisperd (pid {pid}): {exc.strerror}"
    deadline = time.monotonic() + timeout
    while reload_count(state_dir) == before:
        if time.monotonic() >= deadline:
            return f"whisperd (pid {pid}) did not finish reloading within {timeout:.0f} s"
        time.sleep(0.1)
    return None
