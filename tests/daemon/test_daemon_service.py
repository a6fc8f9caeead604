"""The real daemon as a service: what systemd, Prometheus and the journal see.

systemd's side is a real AF_UNIX datagram socket standing where systemd's
notify socket would ($NOTIFY_SOCKET); a thread records every message with
its arrival time. Prometheus's side is a real scrape of /metrics checked by
promtool. The journal's side is the daemon's output: JSON lines.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import SENTENCES, SpeechFactory, require_tool
from tests.daemon_harness import DaemonUnderTest
from whisperd.config import DaemonConfig
from whisperd.config_load import load_config
from whisperd.daemon.root import Daemon, watchdog_ping_seconds
from whisperd.daemon.sdnotify import Notifier
from whisperd.jobs import FileIdentity, JobState
from whisperd.watch.rules import WatchSpec
from whisperd.watch.watcher import Watcher

DaemonFactory = Callable[..., DaemonUnderTest]

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "whisperd.service"

# systemd's watchdog timeout handed to the daemon in these tests (WatchdogSec=2).
WATCHDOG_USEC = 2_000_000


# --------------------------------------------------------------------------- systemd's socket


@dataclass(frozen=True)
class Notification:
    # time.time() and time.monotonic() when the datagram was read.
    wall: float
    monotonic: float
    # KEY -> VALUE of every line of the datagram.
    fields: dict[str, str] = field(default_factory=dict)


class NotifySocket:
    """A bound datagram socket read by a thread it owns (start/stop/join)."""

    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "notify.sock")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        # The reader checks its stop event this often.
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._thread = threading.Thread(target=self._read, name="notify-socket-reader")

    def env(self, *, watchdog_usec: int | None = None) -> dict[str, str]:
        """The environment systemd gives a Type=notify service. WATCHDOG_PID
        is left empty: systemd would name the main pid, unknown before start."""
        env = {"NOTIFY_SOCKET": self.path, "WATCHDOG_PID": "", "WATCHDOG_USEC": ""}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)
        self._socket.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().splitlines()
            message = Notification(
                wall=time.time(),
                monotonic=time.monotonic(),
                fields=dict(line.split("=", 1) for line in lines if "=" in line),
            )
            with self._lock:
                self._received.append(message)

    def messages(self, key: str | None = None, value: str | None = None) -> list[Notification]:
        with self._lock:
            received = list(self._received)
        return [
            m
            for m in received
            if key is None or (key in m.fields and (value is None or m.fields[key] == value))
        ]

    def wait_for(
        self, key: str, value: str | None = None, *, count: int = 1, timeout: float = 60.0
    ) -> Notification:
        """The count-th message carrying KEY (=value), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(key, value)
            if len(found) >= count:
                return found[count - 1]
            self._stop.wait(0.05)
        raise AssertionError(f"no {key}={value or '*'} (#{count}) within {timeout}s: {self.messages()}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # A socket path must fit in 108 bytes; a long test name can push tmp_path past that.
    short = len(str(tmp_path)) < 80
    folder = tmp_path if short else Path(tempfile.mkdtemp(prefix="wd-notify-"))
    listener = NotifySocket(folder)
    listener.start()
    yield listener
    listener.stop()
    if not short:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def drop_into(folder: Path, source: Path, name: str | None = None) -> Path:
    """Copy under a temporary name, then rename, as a careful user does."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    temp = folder / f".{target.name}.part"
    shutil.copyfile(source, temp)
    os.rename(temp, target)
    return target


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of every sample in a scrape."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{name} {labels} matches {len(found)} samples"
    return found[0] if found else None


def event_index(daemon: DaemonUnderTest, name: str) -> int:
    names = [e.get("event") for e in daemon.events()]
    assert name in names, f"no {name} in the log:\n{daemon.log_text()}"
    return names.index(name)


def every_line_is_a_json_object(daemon: DaemonUnderTest) -> None:
    for line in daemon.lines:
        assert isinstance(json.loads(line), dict), line


# --------------------------------------------------------------------------- systemd: notify


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ready_comes_after_start_up_reconciliation_then_status_watchdog_and_stopping(
    daemon_factory: DaemonFactory, speech: SpeechFactory, notify_socket: NotifySocket
) -> None:
    daemon = daemon_factory()
    # Left behind by the last run: a file waiting in the inbox and a half-written output.
    daemon.drop(speech(SENTENCES[0], "waiting"))
    daemon.output.mkdir(parents=True)
    stale = daemon.output / ".waiting.txt.1a2b3c.whisperd-tmp"
    stale.write_text("half a transcript")

    daemon.start(wait_ready=False, env=notify_socket.env(watchdog_usec=WATCHDOG_USEC))
    ready = notify_socket.wait_for("READY", "1")

    # The waiting file was a job, and the stale temp file gone, before READY.
    job = daemon.job_for("waiting.wav")
    assert job is not None and job.created_at <= ready.wall
    assert not stale.exists()
    assert event_index(daemon, "output.temp_removed") < event_index(daemon, "daemon.ready")
    assert event_index(daemon, "job.queued") < event_index(daemon, "daemon.ready")
    # A worker has imported torch and opened the store before READY, too.
    assert event_index(daemon, "worker.ready") < event_index(daemon, "daemon.ready")
    assert "STATUS" in ready.fields

    daemon.wait_for_state("waiting.wav", JobState.DONE)
    # The status line systemctl shows carries the queue summary.
    daemon.wait_for(
        lambda: any(
            "queued 0, running 0, done 1" in m.fields["STATUS"] for m in notify_socket.messages("STATUS")
        ),
        timeout=30.0,
        what="a STATUS line with the finished job",
    )

    # WatchdogSec=2: keep-alives keep coming once the daemon is ready, and none
    # before (how often they come is the unit test of watchdog_ping_seconds).
    notify_socket.wait_for("WATCHDOG", "1", count=6, timeout=30.0)
    received = [m.fields.keys() for m in notify_socket.messages()]
    first_ping = next(i for i, keys in enumerate(received) if "WATCHDOG" in keys)
    assert first_ping > next(i for i, keys in enumerate(received) if "READY" in keys), received

    assert daemon.stop(signal.SIGTERM) == 0
    stopping = notify_socket.wait_for("STOPPING", "1", timeout=10.0)
    assert not [m for m in notify_socket.messages("WATCHDOG") if m.monotonic > stopping.monotonic]


def test_the_watcher_tells_when_the_files_found_at_start_are_handed_over(tmp_path: Path) -> None:
    """What READY waits for: every file found at start is a job, except one
    still being written (nobody is waiting for that one yet)."""
    inbox, cancel = tmp_path / "inbox", tmp_path / "cancel"
    inbox.mkdir()
    cancel.mkdir()
    (inbox / "waiting.wav").write_bytes(b"RIFF" * 100)
    growing = inbox / "growing.wav"
    growing.write_bytes(b"RIFF")
    handed: list[str] = []

    def on_settled(_spec: WatchSpec, path: str, _identity: FileIdentity) -> None:
        handed.append(os.path.basename(path))

    watcher = Watcher(
        [WatchSpec(name="main", root=str(inbox), cancel_dir=str(cancel))],
        settle_seconds=0.5,
        rescan_seconds=0,
        on_settled=on_settled,
        on_cancel=on_settled,
        on_rejected=lambda _spec, _path, _reason: None,
    )
    watcher.start(observe=False, run_loop=False)
    try:
        start = time.monotonic()
        watcher.step(start)  # the first look at both files
        assert not watcher.wait_start_settled(0)
        with growing.open("ab") as more:
            more.write(b"more")
        watcher.step(start + 0.6)
        assert handed == ["waiting.wav"]
        assert watcher.wait_start_settled(0)
    finally:
        watcher.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_a_long_job_extends_the_stop_timeout_while_it_drains_quietly(
    daemon_factory: DaemonFactory, speech: SpeechFactory, notify_socket: NotifySocket
) -> None:
    """Also run at log_level = "warning": the daemon's info events are not printed."""
    grace = 5.0
    daemon = daemon_factory(daemon={"shutdown_grace_seconds": grace, "log_level": "warning"})
    daemon.start(wait_ready=False, env=notify_socket.env())
    notify_socket.wait_for("READY", "1")
    # About 90 s of speech: far more than a worker transcribes within the grace period.
    daemon.drop(speech(" ".join(SENTENCES * 2), "long"))
    daemon.wait_for_state("long.wav", JobState.RUNNING)
    assert daemon.stop(signal.SIGTERM) == 0

    stopping = notify_socket.wait_for("STOPPING", "1", timeout=5.0)
    extends = [m for m in notify_socket.messages("EXTEND_TIMEOUT_USEC") if m.monotonic >= stopping.monotonic]
    # Renewed while the grace period runs (about once a second), so systemd
    # does not kill a daemon that is still draining.
    assert len(extends) >= 2, extends
    assert all(0 < int(m.fields["EXTEND_TIMEOUT_USEC"]) <= (grace + 5) * 1_000_000 for m in extends)
    # The job did not fit in the grace period: it waits in the queue, attempt not spent.
    job = daemon.job_for("long.wav")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0, job
    assert (daemon.inbox / "long.wav").exists()

    every_line_is_a_json_object(daemon)
    levels = {e.get("level") for e in daemon.events()}
    assert levels <= {"warning", "error", "critical"}, daemon.log_text()
    assert not daemon.events("job.queued") and not daemon.events("daemon.ready")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_keep_alive_while_a_worker_is_dead(
    tmp_path: Path, models_dir: Path, notify_socket: NotifySocket
) -> None:
    setup = DaemonUnderTest(
        tmp_path / "d", models_dir, daemon={"shutdown_grace_seconds": 0.5}, metrics={"enabled": False}
    )
    notifier = Notifier(notify_socket.env(watchdog_usec=WATCHDOG_USEC))
    daemon = Daemon(load_config(str(setup.config_path)), notifier=notifier)
    before = {p.pid for p in multiprocessing.active_children()}
    daemon.start()
    try:
        notify_socket.wait_for("READY", "1")
        daemon.loop_once()
        notify_socket.wait_for("WATCHDOG", "1")
        (worker,) = [p for p in multiprocessing.active_children() if p.pid not in before]
        worker.kill()
        worker.join(10)

        # A ping is due, but the pass finds the worker dead: none is sent, and
        # the pass starts a new worker; the next pass pings again.
        daemon.loop_once(now=time.monotonic() + 1.0)
        daemon.loop_once(now=time.monotonic() + 1.0)
    finally:
        daemon.stop()
        setup.close()
    # Datagrams from one socket arrive in order: once STOPPING is here, every
    # ping sent before it is too. Two means the dead-worker pass sent none.
    notify_socket.wait_for("STOPPING", "1", timeout=5.0)
    received = [m.fields for m in notify_socket.messages()]
    before_stop = received[: next(i for i, fields in enumerate(received) if "STOPPING" in fields)]
    assert [fields["WATCHDOG"] for fields in before_stop if "WATCHDOG" in fields] == ["1", "1"], received


# --------------------------------------------------------------------------- SIGHUP


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sighup_adds_and_removes_inboxes_without_touching_the_running_job(
    daemon_factory: DaemonFactory, speech: SpeechFactory, notify_socket: NotifySocket
) -> None:
    daemon = daemon_factory()
    daemon.start(env=notify_socket.env())
    daemon.drop(speech(" ".join(SENTENCES[:2]), "running"))
    daemon.wait_for_state("running.wav", JobState.RUNNING)

    second = DaemonUnderTest.default_inbox(daemon.root, "second")
    daemon.inboxes.append(second)
    daemon.write_config()
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_event("config.reloaded", inboxes=["main", "second"])
    # systemd hears the reload begin and end.
    reloading = notify_socket.wait_for("RELOADING", "1")
    assert "MONOTONIC_USEC" in reloading.fields
    assert notify_socket.wait_for("READY", "1", count=2).monotonic >= reloading.monotonic

    drop_into(Path(second["path"]), speech(SENTENCES[1], "added"))
    added = daemon.wait_for_state("added.wav", JobState.DONE)
    assert added.spec.inbox == "second"
    assert (Path(second["output"]) / "added.txt").read_text().strip()
    # The worker records done first and moves the source a moment later.
    daemon.wait_for(
        lambda: (daemon.store.get(added.id) or added).disposed_at is not None,
        timeout=60.0,
        what="added.wav moved after its job ended",
    )
    assert (Path(second["done"]) / "added.wav").exists()
    # The job that ran through the reload finished normally.
    assert daemon.wait_for_state("running.wav", JobState.DONE).attempts == 1
    # job.done is logged after the store says done (and the source moved).
    daemon.wait_for_event("job.done", file="running.wav")
    names = [(e.get("event"), e.get("file")) for e in daemon.events()]
    reloaded = names.index(("config.reloaded", None))
    assert names.index(("job.claimed", "running.wav")) < reloaded < names.index(("job.done", "running.wav"))

    # A broken config is refused; the daemon carries on with the one it has.
    daemon.config_path.write_text("[daemon\nthis is not toml\n", encoding="utf-8")
    daemon.send_signal(signal.SIGHUP)
    failed = daemon.wait_for_event("config.reload_failed")
    assert str(daemon.config_path) in failed["error"]
    notify_socket.wait_for("READY", "1", count=3)

    # Removing an inbox stops watching it. `whisperd reload` (the unit's
    # ExecReload) returns only once the daemon has reloaded.
    daemon.inboxes.remove(second)
    daemon.write_config()
    reply = daemon.cli("reload")
    returned = time.time()
    assert reply.returncode == 0, reply
    reload_event = daemon.wait_for_event("config.reloaded", inboxes=["main"])
    when = datetime.datetime.fromisoformat(reload_event["timestamp"].replace("Z", "+00:00")).timestamp()
    assert when <= returned
    notify_socket.wait_for("READY", "1", count=4)
    ignored = drop_into(Path(second["path"]), speech(SENTENCES[2], "ignored"))
    daemon.drop(speech(SENTENCES[3], "kept"))
    daemon.wait_for_state("kept.wav", JobState.DONE)
    # A rescan (every 2 s) after the drop would have found it, had the inbox still been watched.
    daemon.wait_for_rescans(2)
    assert daemon.job_for("ignored.wav") is None
    assert ignored.exists()
    assert daemon.stop() == 0


def test_a_reload_reports_settings_it_cannot_apply_and_refuses_a_broken_file(
    tmp_path: Path, models_dir: Path, notify_socket: NotifySocket
) -> None:
    """In process and without starting anything: reload() only reads the file."""
    setup = DaemonUnderTest(tmp_path / "d", models_dir)
    daemon = Daemon(load_config(str(setup.config_path)), notifier=Notifier(notify_socket.env()))

    setup.worker_settings["cpu_threads"] = 2
    setup.daemon_settings["shutdown_grace_seconds"] = 3.0
    setup.write_config()
    with capture_logs() as logs:
        daemon.reload()
    events = {e["event"]: e for e in logs}
    assert "config.reloaded" in events
    # shutdown_grace_seconds applies at once; the worker threads need a restart.
    assert events["config.restart_needed"]["settings"] == ["workers.cpu_threads"]

    setup.worker_settings["cpu_threads"] = -1
    setup.write_config()
    with capture_logs() as logs:
        daemon.reload()
    (failed,) = [e for e in logs if e["event"] == "config.reload_failed"]
    assert failed["log_level"] == "error" and "cpu_threads" in failed["error"]
    assert str(setup.config_path) in failed["error"]
    # Every RELOADING=1 is answered by READY=1, whether the reload worked or not.
    notify_socket.wait_for("READY", "1", count=2, timeout=5.0)
    assert len(notify_socket.messages("RELOADING", "1")) == 2


# --------------------------------------------------------------------------- Prometheus and logs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_finished_job_shows_in_a_real_scrape_and_in_json_logs(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    promtool = require_tool("promtool", "prometheus")
    daemon = daemon_factory()
    started_at = time.time()
    daemon.start()
    daemon.drop(speech(SENTENCES[4], "scraped"))
    job = daemon.wait_for_state("scraped.wav", JobState.DONE)
    port = daemon.metrics_port

    texts: list[str] = []

    def scraped_after_the_events_arrived() -> bool:
        # The worker's events reach the daemon on its next pass (0.2 s), the
        # watcher's on its next housekeeping (5 s): a scrape may precede both.
        texts[:] = [scrape(port)]
        finished = value(texts[0], "whisperd_jobs_finished_total", inbox="main", outcome="done")
        return (
            finished is not None
            and value(texts[0], "whisperd_watcher_events_total", kind="moved") is not None
        )

    daemon.wait_for(scraped_after_the_events_arrived, timeout=30.0, what="job and watcher events in a scrape")
    text = texts[0]

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    assert value(text, "whisperd_jobs_finished_total", inbox="main", outcome="done") == 1
    assert value(text, "whisperd_jobs_queued_total", inbox="main") == 1
    assert (value(text, "whisperd_audio_seconds_total", inbox="main") or 0) > 5
    assert (value(text, "whisperd_model_loads_total", model="tiny.en", device="cpu") or 0) >= 1
    assert value(text, "whisperd_job_realtime_factor_count", inbox="main", device="cpu") == 1
    assert value(text, "whisperd_job_queue_wait_seconds_count", inbox="main") == 1
    assert value(text, "whisperd_jobs", state="done") == 1
    assert value(text, "whisperd_jobs", state="queued") == 0
    # The rescan this daemon ran: after it started, before the scrape.
    rescanned = value(text, "whisperd_last_rescan_timestamp_seconds") or 0
    assert started_at <= rescanned <= time.time()
    assert value(text, "whisperd_build_info") == 1
    assert (value(text, "process_resident_memory_bytes") or 0) > 0

    # The worker logs job.done after it reported the job to the pool (the
    # metric) and moved the source: the scrape may come first.
    daemon.wait_for_event("job.done", file="scraped.wav")
    every_line_is_a_json_object(daemon)
    for name in ("job.queued", "job.claimed", "job.done"):
        (event,) = daemon.events(name)
        assert event["job_id"] == job.id and event["inbox"] == "main" and event["file"] == "scraped.wav"
        assert event["level"] == "info" and event["timestamp"].endswith("Z")
    for name in ("job.claimed", "job.done"):
        assert daemon.events(name)[0]["device"] == "cpu"
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- the unit file


def unit_service_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and line and not line.startswith("#"):
            key, _, setting = line.partition("=")
            settings[key] = setting
    return settings


def test_the_unit_matches_what_the_daemon_does_on_stop_and_for_the_watchdog() -> None:
    service = unit_service_settings()
    # systemd signals the daemon only; the daemon drains and stops its workers.
    assert service["KillMode"] == "mixed"
    # Room for the default grace period plus stopping workers and the store.
    assert float(service["TimeoutStopSec"]) >= DaemonConfig().shutdown_grace_seconds + 30
    # The daemon pings every min(5 s, WatchdogSec/2): with the shipped unit's
    # timeout, every 5 s (its housekeeping tick); with short timeouts, twice per timeout.
    assert watchdog_ping_seconds(float(service["WatchdogSec"])) == 5.0
    assert [watchdog_ping_seconds(w) for w in (2.0, 8.0, 10.0, 11.0, 600.0)] == [1.0, 4.0, 5.0, 5.0, 5.0]
    # Without a watchdog it still wakes on the housekeeping tick.
    assert watchdog_ping_seconds(None) == 5.0
    # Type=notify (systemd 252 has no notify-reload); ExecReload waits for the reload.
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/usr/bin/whisperd reload --config /etc/whisperd/config.toml"
