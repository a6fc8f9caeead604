"""The README's two commands, as a user runs them on a fresh clone.

`scripts/run` is run for real in a copy of the working tree (what git tracks
plus untracked files it does not ignore, so uncommitted work is tested too;
never .venv or var/): it makes its own .venv with pip, imports the bundled
tiny.en, and runs the daemon on the shipped config.toml until Ctrl-C (SIGINT
to its process group). A spoken sentence dropped into the inbox that
config.toml names comes out as a transcript in its output folder.

`scripts/test` runs the whole suite, which cannot sensibly run inside the
suite; what it stands on is checked cheaply instead: every script parses,
every script the README names is there and executable, every whisperd module
a script names exists, and the system packages it installs are the README's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SENTENCES, SpeechFactory, missing_install, require_tool, wer

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# Folders holding the project's shell scripts.
SCRIPT_FOLDERS = ("scripts", ".ci")
# Never copied into the fresh clone, even were they tracked: the developer's
# own virtual environment and the daemon's folders of a local run.
NOT_CLONED = (".venv", "var")
# pip making .venv: torch from a local wheel or the registry, then whisperd's
# dependencies from the registry (minutes on a cold cache, 2 cores).
SETUP_SECONDS = 1800.0
# One spoken sentence, model load included, on the CPU.
TRANSCRIBE_SECONDS = 300.0
# SIGINT to exit: nothing is running, so no shutdown grace is waited for.
STOP_SECONDS = 60.0
# Clean synthetic speech through tiny.en is this close to the text (tests/e2e/test_e2e.py).
WER_BOUND = 0.5
# Polling interval of every wait.
POLL_SECONDS = 0.5


# --------------------------------------------------------------------------- scripts/run


def fresh_clone(target: Path) -> Path:
    """Copy what a clone plus the uncommitted work holds: `git ls-files -co
    --exclude-standard` (tracked, and untracked but not ignored), modes and
    links kept, files deleted in the working tree left out."""
    git = require_tool("git", "git")
    listed = subprocess.run(
        [git, "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8", "surrogateescape")
    copied = 0
    for name in sorted(set(filter(None, listed.split("\0")))):
        if Path(name).parts[0] in NOT_CLONED:
            continue
        source = REPO / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree, not yet in git
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)
        copied += 1
    assert copied and (target / "scripts" / "run").is_file(), f"nothing usable copied from {REPO}"
    return target


def user_environment() -> dict[str, str]:
    """This process's environment without the test suite's virtual
    environment: the fresh clone's scripts must find and make their own."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "WHISPERD_CONFIG"):
        env.pop(name, None)
    if sys.prefix != sys.base_prefix:
        own_bin = os.path.join(sys.prefix, "bin")
        kept = [p for p in env.get("PATH", "").split(os.pathsep) if p and os.path.abspath(p) != own_bin]
        env["PATH"] = os.pathsep.join(kept)
    # pip stays quiet (with scripts/setup's -q: errors only) and never asks anything.
    env.update(PIP_QUIET="1", PIP_PROGRESS_BAR="off", PIP_NO_INPUT="1")
    return env


def require_package_index() -> None:
    """pip must reach the package index scripts/setup installs from. Asked of
    pip itself (same configuration, proxies and certificates as the install)
    about the pinned engine; nothing is installed."""
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "index",
            "versions",
            "openai-whisper",
            "--retries",
            "1",
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        env=user_environment(),
        check=False,
    )
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        missing_install(
            f"pip cannot reach the package index scripts/setup installs from: {lines[-1] if lines else ''}"
        )


def require_venv_support() -> None:
    """scripts/setup makes .venv with `python3 -m venv`, which needs ensurepip."""
    python = shutil.which(os.environ.get("PYTHON", "python3"), path=user_environment()["PATH"])
    if python is None:
        missing_install("python3 is not installed (Debian package python3)")
    done = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True, check=False)
    if done.returncode != 0:
        missing_install("python3 cannot make a virtual environment (Debian package python3-venv)")


def require_free_port(port: int) -> None:
    """The shipped config's metrics port (already taken: scripts/run is running elsewhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            missing_install(
                f"port {port} of the shipped config.toml is taken ({exc.strerror}): is whisperd running?"
            )


def resolve(value: str, config_file: Path) -> Path:
    """A path of the config as whisperd reads it (config_load): relative to the file's folder."""
    return Path(os.path.normpath(os.path.join(config_file.parent, os.path.expanduser(value))))


class ReadmeRun:
    """`scripts/run` in its own process group, stdout and stderr in one file."""

    def __init__(self, clone: Path, log: Path) -> None:
        self.clone = clone
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                ["scripts/run"],
                cwd=clone,
                env=user_environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 80) -> str:
        """The log's last lines, under its path (kept after the test)."""
        return "\n".join([f"--- {self.log}", *self.text().splitlines()[-lines:]])

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # pip, the script's own lines
            if isinstance(item, dict) and item.get("event") == name:
                found.append(item)
        return found

    def wait_for(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"scripts/run exited ({self.process.returncode}) waiting for {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.tail()}")
            time.sleep(POLL_SECONDS)

    def ctrl_c(self) -> int:
        """What Ctrl-C on its terminal does: SIGINT to the whole foreground group."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {STOP_SECONDS:.0f}s after SIGINT:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL to whatever of the group is left (pip, the daemon); the
        daemon's workers, in groups of their own, die with it (parent-death signal)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(30)


@pytest.fixture
def readme_run(tmp_path: Path) -> Iterator[Callable[[], ReadmeRun]]:
    """start() -> scripts/run started in a fresh clone under tmp_path; the clone
    (with its .venv, a few GB) is removed after the test, its log kept."""
    clone = tmp_path / "clone"
    started: list[ReadmeRun] = []

    def start() -> ReadmeRun:
        run = ReadmeRun(fresh_clone(clone), tmp_path / "run.log")
        started.append(run)
        return run

    try:
        yield start
    finally:
        for run in started:
            run.kill()
        shutil.rmtree(clone, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(SETUP_SECONDS + TRANSCRIBE_SECONDS + STOP_SECONDS + 300)
def test_scripts_run_on_a_fresh_clone_transcribes_what_is_dropped_and_stops_on_ctrl_c(
    readme_run: Callable[[], ReadmeRun], speech: SpeechFactory
) -> None:
    require_tool("ffmpeg", "ffmpeg")
    require_venv_support()
    require_package_index()
    shipped = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    require_free_port(int(shipped["metrics"]["port"]))
    clip = speech(SENTENCES[0], "talk")

    run = readme_run()
    config_file = run.clone / "config.toml"
    config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    inbox_table = config["inbox"][0]
    inbox, output, done = (resolve(inbox_table[key], config_file) for key in ("path", "output", "done"))
    models = resolve(config["models"]["folder"], config_file)

    run.wait_for(lambda: bool(run.events("daemon.ready")), timeout=SETUP_SECONDS, what="daemon.ready")
    assert (models / "tiny.en.pt").is_file(), f"bundled tiny.en not imported into {models}:\n{run.tail()}"

    # Dropped as a careful user does: copied under a dotfile name, then renamed.
    inbox.mkdir(parents=True, exist_ok=True)
    temp = inbox / f".{clip.name}.part"
    shutil.copyfile(clip, temp)
    temp.rename(inbox / clip.name)
    transcript = output / "talk.txt"
    run.wait_for(
        lambda: transcript.is_file() and (done / clip.name).is_file(),
        timeout=TRANSCRIBE_SECONDS,
        what=f"{transcript} and the source in {done}",
    )
    text = transcript.read_text(encoding="utf-8")
    assert wer(SENTENCES[0], text) < WER_BOUND, f"{text!r} is far from {SENTENCES[0]!r}"

    assert run.ctrl_c() == 0, run.tail()
    assert "Traceback" not in run.text(), run.tail(200)


# --------------------------------------------------------------------------- scripts/test and the rest


def shell_scripts() -> list[Path]:
    """Every file of SCRIPT_FOLDERS that starts with a shebang."""
    found = []
    for folder in SCRIPT_FOLDERS:
        for path in sorted((REPO / folder).iterdir()):
            if path.is_file() and path.read_bytes().startswith(b"#!"):
                found.append(path)
    return found


def test_every_script_parses() -> None:
    bash = require_tool("bash", "bash")
    scripts = shell_scripts()
    assert {"run", "setup", "test", "system-packages"} <= {p.name for p in scripts}
    for path in scripts:
        done = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{path.relative_to(REPO)}: {done.stderr}"


def test_every_script_the_readme_names_is_there_and_executable() -> None:
    readme = README.read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w./-])((?:scripts|\.ci)/[\w.-]*\w)", readme))
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = {line.split()[0] for line in block.splitlines() if line.strip()}
    assert commands == {"scripts/run", "scripts/test"}, block
    for name in sorted(named | commands):
        path = REPO / name
        assert path.is_file(), f"the README names {name}, which is not there"
        if name in commands or path.read_bytes().startswith(b"#!"):
            assert path.read_bytes().startswith(b"#!"), f"{name} has no #! line"
            assert os.access(path, os.X_OK), f"{name} is not executable (git update-index --chmod=+x)"


_MODULE_USE = re.compile(
    r"\b(?:from\s+(whisperd(?:\.\w+)*)\s+import\s+([\w, ]+)|(?:import|-m)\s+(whisperd(?:\.\w+)*))"
)


def test_every_whisperd_module_a_script_names_exists() -> None:
    """A script that reaches into whisperd's modules (python -c, -m) breaks
    silently when they move; what any of them names must be there."""
    for path in shell_scripts():
        for found in _MODULE_USE.finditer(path.read_text(encoding="utf-8")):
            module = found.group(1) or found.group(3)
            where = f"{path.relative_to(REPO)}: {found.group(0)!r}"
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            for name in filter(None, (n.strip() for n in (found.group(2) or "").split(","))):
                attribute = name.split()[0]
                assert hasattr(importlib.import_module(module), attribute), f"{where}: no {attribute}"


def test_the_system_packages_scripts_test_installs_are_the_readmes() -> None:
    listed = [
        line.strip()
        for line in (REPO / "scripts" / "test-packages").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed
    readme = README.read_text(encoding="utf-8")
    for pair in listed:
        assert re.fullmatch(r"[\w.+-]+:[\w.+-]+", pair), (
            f"scripts/test-packages: {pair!r} is not package:command"
        )
        package, command = pair.split(":")
        assert f"`{package}`" in readme, f"README does not name the test package {package} ({command})"
