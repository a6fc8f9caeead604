"""The reading commands against hostile names and a store they may not write.

`whisperd status` / `jobs` / `show` print names and errors that users chose: control
characters must reach the terminal escaped. They are run by group members who
cannot write the state folder: they must read without writing or migrating,
and a wrong path must fail with a message, never make an empty store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.daemon_harness import WHISPERD, DaemonUnderTest
from whisperd.cli.terminal import terminal_safe
from whisperd.jobs import JobState

# An xterm "set window title" (OSC 0 ... BEL), a CSI "clear screen", a C1 CSI,
# DEL, a bidi override and a newline that would forge a second line.
HOSTILE = "\x1b]0;owned\x07talk\x1b[2J\x9b1m\x7f\u202eyalp\nforged"


def _raw_controls(text: str) -> list[str]:
    """The raw control / bidi characters in `text` (its own line breaks aside)."""
    return [c for c in text if c != "\n" and terminal_safe(c) != c]


def test_terminal_safe_escapes_every_control_and_keeps_plain_text() -> None:
    assert terminal_safe("Recording (2).m4a — café") == "Recording (2).m4a — café"
    assert terminal_safe("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert terminal_safe("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert terminal_safe("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"
    assert terminal_safe("\u202ex\u2066\u200f\u2028") == "\\u202ex\\u2066\\u200f\\u2028"
    assert terminal_safe(os.fsdecode(b"bad\xffname")) == "bad\\xffname"


def _no_root_override() -> list[str]:
    """Run a command without root's permission override, as a group member
    would be; [] when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root without setpriv: cannot run the CLI without write access")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _cli(wrapper: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wrapper, *WHISPERD, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_hostile_names_and_errors_are_escaped_by_status_and_jobs(  # type: ignore[no-untyped-def]
    daemon_factory, speech, tmp_path: Path
) -> None:
    daemon: DaemonUnderTest = daemon_factory("names")
    daemon.start()
    good = daemon.drop(speech("hello there", "hello"), f"{HOSTILE}.wav")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all " * 64)
    bad = daemon.drop(broken, "bad\x1b[31m\u202e\n.wav")
    done = daemon.wait_for_state(good.name, JobState.DONE)
    failed = daemon.wait_for_state(bad.name, JobState.FAILED)
    assert failed.last_error and "\x1b" in failed.last_error  # the reason names the file
    readers = [("status",), ("jobs",), ("show", str(done.id)), ("show", str(failed.id))]
    for command in [*readers, *((*args, "--json") for args in readers)]:
        result = daemon.cli(*command)
        assert result.returncode == 0, result.stderr
        assert _raw_controls(result.stdout) == [], result.stdout
        assert not any(line.startswith("forged") for line in result.stdout.splitlines())
    listing = daemon.cli("jobs").stdout
    assert terminal_safe(f"main/{done.spec.rel_path}") in listing
    assert terminal_safe(f"main/{failed.spec.rel_path}") in listing
    assert terminal_safe(failed.last_error) in listing  # the error line, escaped whole


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_reading_commands_work_on_a_store_they_cannot_write(daemon_factory, speech) -> None:  # type: ignore[no-untyped-def]
    daemon: DaemonUnderTest = daemon_factory("readonly")
    daemon.start()
    dropped = daemon.drop(speech("hello there", "hello"), "kept.wav")
    daemon.wait_for_state(dropped.name, JobState.DONE)
    wrapper = _no_root_override()
    state = daemon.state_dir
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [state, *state.iterdir()]}
    try:
        for path in state.iterdir():
            path.chmod(0o444)
        state.chmod(0o555)
        # While the daemon runs (its -wal and -shm exist) and after it stopped (gone).
        for phase in ("running", "stopped"):
            if phase == "stopped":
                assert daemon.stop() == 0
            before = _digest(state)
            for command in ("status", "jobs", "show"):
                ids = ["1"] if command == "show" else []
                result = _cli(wrapper, command, *ids, "--config", str(daemon.config_path))
                assert result.returncode == 0, f"{phase} {command}: {result.stderr}"
                assert "kept.wav" in result.stdout or "done 1" in result.stdout, result.stdout
            if phase == "stopped":
                assert _digest(state) == before  # nothing written, created or migrated
    finally:
        state.chmod(modes[state])
        for path, mode in modes.items():
            if path.exists():
                path.chmod(mode)


def test_a_wrong_config_or_database_path_fails_naming_it_and_creates_nothing(
    tmp_path: Path, models_dir: Path
) -> None:
    missing = tmp_path / "nope" / "config.toml"
    for command in ("status", "jobs"):
        result = _cli([], command, "--config", str(missing))
        assert result.returncode == 2
        assert str(missing) in result.stderr and "not found" in result.stderr
    assert not (tmp_path / "nope").exists()

    never_started = DaemonUnderTest(tmp_path / "fresh", models_dir)  # a valid config, no daemon run yet
    state, config = never_started.state_dir, never_started.config_path
    for command in ("status", "jobs", "show"):
        ids = ["1"] if command == "show" else []
        result = _cli([], command, *ids, "--config", str(config))
        assert result.returncode == 1, result.stdout
        assert str(state / "jobs.db") in result.stderr and "no job store" in result.stderr
    assert not state.exists()
