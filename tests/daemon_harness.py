"""Run the real `whisperd run` in a subprocess on temporary folders.

Tests drop real files into its inbox, read its JSON log lines, look at the
real job store, and send it real signals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from whisperd.jobs import Job, JobState
from whisperd.store.job_store import JobStore

WHISPERD = [sys.executable, "-m", "whisperd.cli"]


def _toml_value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _toml_table(values: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {_toml_value(value)}" for key, value in values.items())


class DaemonUnderTest:
    """One whisperd daemon with its own folders under `root`."""

    def __init__(
        self,
        root: Path,
        models_dir: Path,
        *,
        inboxes: list[dict[str, Any]] | None = None,
        daemon: dict[str, Any] | None = None,
        workers: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        inbox: dict[str, Any] | None = None,
        database_url: str | None = None,
    ) -> None:
        """database_url: the job store (None: SQLite jobs.db in the state folder)."""
        # A command the daemon is started through (setpriv, unshare); none by default.
        self.wrapper: list[str] = []
        self.root = root
        self.state_dir = root / "state"
        self.inboxes = inboxes or [self.default_inbox(root, **(inbox or {}))]
        main = self.inboxes[0]
        self.inbox = Path(main["path"])
        self.output = Path(main["output"])
        self.cancel = Path(main["cancel"])
        self.done = Path(main["done"])
        self.failed = Path(main["failed"])
        self.config_path = root / "config.toml"
        self.daemon_settings = {
            "state_dir": str(self.state_dir),
            "settle_seconds": 0.5,
            "rescan_seconds": 2.0,
            "shutdown_grace_seconds": 10.0,
            "log_level": "debug",
            "log_format": "json",
            **({"database_url": database_url} if database_url else {}),
            **(daemon or {}),
        }
        self.worker_settings = {
            "devices": "cpu",
            "cpu_threads": 1,
            "heartbeat_seconds": 0.5,
            "lease_seconds": 15.0,
            "retry_base_seconds": 0.2,
            "retry_max_seconds": 1.0,
            "cancel_grace_seconds": 1.0,
            **(workers or {}),
        }
        self.metrics_settings = {"enabled": True, "port": 0, **(metrics or {})}
        self.models_dir = models_dir
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._store: JobStore | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.write_config()

    @staticmethod
    def default_inbox(root: Path, name: str = "main", **overrides: Any) -> dict[str, Any]:
        base = root / name
        return {
            "name": name,
            "path": str(base / "inbox"),
            "output": str(base / "output"),
            "cancel": str(base / "cancel"),
            "done": str(base / "done"),
            "failed": str(base / "failed"),
            "formats": ["txt", "srt", "vtt", "json", "tsv"],
            **overrides,
        }

    def write_config(self) -> None:
        parts = [
            "[daemon]\n" + _toml_table(self.daemon_settings),
            "[models]\n" + _toml_table({"folder": str(self.models_dir), "default": "tiny.en"}),
            "[workers]\n" + _toml_table(self.worker_settings),
            "[metrics]\n" + _toml_table(self.metrics_settings),
            *("[[inbox]]\n" + _toml_table(i) for i in self.inboxes),
        ]
        self.config_path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")

    # -- process ---------------------------------------------------------------

    def start(
        self,
        *,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        crash_point: str = "",
    ) -> None:
        """crash_point: the hidden `--crash-point` (crash_points.ALL): the
        worker kills the daemon and itself there."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.lines = []
        crash = ["--crash-point", crash_point] if crash_point else []
        self.process = subprocess.Popen(
            [*self.wrapper, *WHISPERD, "run", "--config", str(self.config_path), *crash],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), name="daemon-log-reader")
        self._reader.start()
        if wait_ready:
            self.wait_for_event("daemon.ready", timeout=timeout)

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = []
        for line in list(self.lines):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and (name is None or item.get("event") == name):
                parsed.append(item)
        return parsed

    def wait_for_event(self, name: str, *, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events(name) if all(e.get(k) == v for k, v in match.items())]
            return bool(found)

        self.wait_for(seen, timeout=timeout, what=f"log event {name} {match or ''}")
        return found[0]

    @property
    def metrics_port(self) -> int:
        return int(self.wait_for_event("daemon.ready")["metrics_port"])

    def last_rescan(self) -> float:
        """When the daemon's last inbox rescan ran, as its metric says (0: none yet)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found = re.search(r"^whisperd_last_rescan_timestamp_seconds (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_for_rescans(self, count: int = 1, *, timeout: float = 60.0) -> None:
        """Wait until `count` inbox rescans have run after this call: what a
        rescan would do to the files there now, it has done."""
        # The metric is refreshed on each housekeeping pass and may move by a
        # hair without a new rescan; distinct rescans are rescan_seconds apart.
        gap = float(self.daemon_settings["rescan_seconds"]) / 2
        since = time.time()

        def rescanned_after(moment: float) -> Callable[[], bool]:
            return lambda: self.last_rescan() > moment

        for number in range(1, count + 1):
            self.wait_for(rescanned_after(since), timeout=timeout, what=f"rescan {number} of {count}")
            since = self.last_rescan() + gap

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the daemon and wait for it to exit; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            if self._reader is not None:
                self._reader.join(10)
        return code

    def kill(self) -> None:
        """kill -9 the daemon (its workers die with it)."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return "\n".join(self.lines[-200:])

    # -- files -------------------------------------------------------------------

    def drop(self, source: Path, name: str | None = None, *, sub: str = "") -> Path:
        """Put a file into the inbox the way a careful user does: copy under a
        temporary name, then rename (a rename is atomic)."""
        folder = self.inbox / sub
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (name or source.name)
        temp = folder / f".{target.name}.part"
        shutil.copyfile(source, temp)
        os.rename(temp, target)
        return target

    def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float = 60.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.process.returncode}) waiting for {what}:\n{self.log_text()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_text()}")

    # -- job store -------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The job store this daemon runs on."""
        return str(self.daemon_settings.get("database_url") or "sqlite:///" + str(self.state_dir / "jobs.db"))

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore.open(self.database_url)
        return self._store

    def jobs(self) -> list[Job]:
        return self.store.list_jobs(limit=100_000)

    def job_for(self, rel_path: str) -> Job | None:
        matches = [j for j in self.jobs() if j.spec.rel_path == rel_path]
        return matches[0] if matches else None

    def wait_for_state(self, rel_path: str, *states: JobState, timeout: float = 120.0) -> Job:
        def reached() -> bool:
            job = self.job_for(rel_path)
            return job is not None and job.state in states

        self.wait_for(reached, timeout=timeout, what=f"{rel_path} in {[s.value for s in states]}")
        job = self.job_for(rel_path)
        assert job is not None
        return job

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        if self._store is not None:
            self._store.close()
            self._store = None

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*WHISPERD, *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@contextmanager
def running_daemon(root: Path, models_dir: Path, **kwargs: Any) -> Iterator[DaemonUnderTest]:
    daemon = DaemonUnderTest(root, models_dir, **kwargs)
    try:
        yield daemon
    finally:
        daemon.close()


class WrappedDaemon(DaemonUnderTest):
    """The real daemon, started through a wrapper command (setpriv, unshare)."""

    def __init__(self, root: Path, models_dir: Path, *, wrapper: list[str], **kwargs: Any) -> None:
        super().__init__(root, models_dir, **kwargs)
        self.wrapper = list(wrapper)
