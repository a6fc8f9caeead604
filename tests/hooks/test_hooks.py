"""Completion hooks through the real daemon: programs run on done/failed,
webhooks POSTed to a real HTTP server in the test, deliveries owed across a
SIGKILL, a hanging hook killed at its timeout, refused configs."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SpeechFactory
from tests.daemon_harness import WHISPERD, DaemonUnderTest
from whisperd.jobs import Job, JobState
from whisperd.store.values import HookDelivery

pytestmark = pytest.mark.slow

DaemonFactory = Callable[..., DaemonUnderTest]

# Writes what it was given (its WHISPERD_* variables and its stdin) to
# RECORDS/<kind>-<job id>-<pid>.json, whole or not at all.
RECORDER = """
import json, os, sys
records = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k.startswith("WHISPERD_")}
body = {"env": env, "stdin": json.loads(sys.stdin.read()), "argv": sys.argv[2:]}
name = f"{env['WHISPERD_HOOK']}-{env['WHISPERD_JOB_ID']}-{os.getpid()}.json"
temp = os.path.join(records, "." + name)
with open(temp, "w") as fh:
    json.dump(body, fh)
os.rename(temp, os.path.join(records, name))
"""
# For a file named hang*: writes its pid and its child's, then waits forever.
HANGER = """
import os, subprocess, sys, time
records = sys.argv[1]
name = os.environ["WHISPERD_FILE"]
if name.startswith("hang"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100000)"])
    with open(os.path.join(records, ".pids"), "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    os.rename(os.path.join(records, ".pids"), os.path.join(records, "pids"))
    while True:
        time.sleep(1)
open(os.path.join(records, "ran-" + name), "w").close()
"""


def not_media(daemon: DaemonUnderTest, name: str) -> Path:
    """A text file posing as audio: its job ends failed at once."""
    path = daemon.root / name
    path.write_text("a shopping list, not a recording\n", encoding="utf-8")
    return path


def write_script(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(text, encoding="utf-8")
    return script


def deliveries(daemon: DaemonUnderTest, job: Job) -> list[HookDelivery]:
    return daemon.store.hook_deliveries_of(job.id)


def wait_delivered(daemon: DaemonUnderTest, rel_path: str, kinds: set[str]) -> Job:
    """The job of rel_path once every one of `kinds` was delivered for it."""

    def delivered() -> bool:
        job = daemon.job_for(rel_path)
        if job is None:
            return False
        return {d.kind for d in deliveries(daemon, job) if d.state == "delivered"} >= kinds

    daemon.wait_for(delivered, timeout=240, what=f"{sorted(kinds)} delivered for {rel_path}")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def scrape(daemon: DaemonUnderTest) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def counted(text: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("whisperd_hook_deliveries_total{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_counted(daemon: DaemonUnderTest, wanted: dict[tuple[str, str], float]) -> None:
    """Until whisperd_hook_deliveries_total of inbox main shows exactly `wanted`
    ((kind, outcome) -> count): each outcome is counted just after the store
    records it. A count past the wanted one fails at once."""
    seen: dict[tuple[str, str], float] = {}

    def reached() -> bool:
        text = scrape(daemon)
        seen.update({key: counted(text, inbox="main", kind=key[0], outcome=key[1]) for key in wanted})
        over = {key: n for key, n in seen.items() if n > wanted[key]}
        assert not over, f"counted more than {wanted}: {seen}"
        return seen == wanted

    daemon.wait_for(reached, timeout=30.0, what=f"hook deliveries counted {wanted}")


# -- hook programs -----------------------------------------------------------------


def test_each_ended_job_runs_its_hook_program_once_with_its_facts(
    daemon_database_url: str | None, daemon_factory: DaemonFactory, speech: SpeechFactory, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    recorder = write_script(tmp_path / "bin", "record.py", RECORDER)
    command = [sys.executable, str(recorder), str(records)]
    daemon = daemon_factory(
        database_url=daemon_database_url,
        workers={"max_attempts": 1},
        inbox={"on_done": [*command, "done"], "on_failed": [*command, "failed"]},
    )
    daemon.start()
    daemon.drop(speech("The quick brown fox jumps over the lazy dog.", "fox"))
    daemon.drop(not_media(daemon, "list.mp3"))
    done = wait_delivered(daemon, "fox.wav", {"on_done"})
    failed = wait_delivered(daemon, "list.mp3", {"on_failed"})

    made = {p.name.rsplit("-", 1)[0]: json.loads(p.read_text()) for p in records.glob("*.json")}
    assert sorted(made) == sorted([f"on_done-{done.id}", f"on_failed-{failed.id}"])  # once each
    on_done, on_failed = made[f"on_done-{done.id}"], made[f"on_failed-{failed.id}"]
    assert on_done["argv"] == ["done"] and on_failed["argv"] == ["failed"]
    env = on_done["env"]
    assert env["WHISPERD_STATE"] == "done" and env["WHISPERD_INBOX"] == "main"
    assert env["WHISPERD_SOURCE"] == str(daemon.done / "fox.wav")  # where it is now
    assert env["WHISPERD_OUTPUTS"].split(os.pathsep) == list(done.outputs)
    assert all(Path(p).is_file() for p in done.outputs)
    assert on_failed["env"]["WHISPERD_STATE"] == "failed"
    assert "not a media file" in on_failed["env"]["WHISPERD_ERROR"]
    assert on_failed["env"]["WHISPERD_SOURCE"] == str(daemon.failed / "list.mp3")

    # stdin is the document of `whisperd show ID --json`: one JSON shape for a job.
    shown = daemon.cli("show", str(done.id), "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert sorted(on_done["stdin"]) == sorted(document)
    assert sorted(on_done["stdin"]["job"]) == sorted(document["job"])
    assert on_done["stdin"]["job"]["id"] == done.id and on_done["stdin"]["job"]["state"] == "done"
    assert [(h["kind"], h["state"], h["attempts"]) for h in document["hooks"]] == [
        ("on_done", "delivered", 1)
    ]
    text = daemon.cli("show", str(failed.id))
    assert "hook      on_failed  delivered after 1 try" in text.stdout

    logged = daemon.wait_for_event("hook.delivered", job_id=done.id)
    assert logged["kind"] == "on_done" and logged["file"] == "fox.wav"
    # The runner records a delivery in the store, logs it, then counts it.
    wait_counted(daemon, {("on_done", "delivered"): 1, ("on_failed", "delivered"): 1})


def test_a_reload_that_adds_a_hook_wakes_the_idle_runner(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    # With no hooks configured the runner threads sleep until a reload, not
    # polling; the reload must wake them, and jobs ended before it owe nothing.
    records = tmp_path / "records"
    records.mkdir()
    recorder = write_script(tmp_path / "bin", "record.py", RECORDER)
    daemon = daemon_factory(workers={"max_attempts": 1})
    daemon.start()
    daemon.drop(not_media(daemon, "before.mp3"))
    before = daemon.wait_for_state("before.mp3", JobState.FAILED)

    daemon.inboxes[0]["on_failed"] = [sys.executable, str(recorder), str(records), "failed"]
    daemon.write_config()
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_event("config.reloaded")
    daemon.drop(not_media(daemon, "after.mp3"))
    after = wait_delivered(daemon, "after.mp3", {"on_failed"})

    assert [p.name.rsplit("-", 1)[0] for p in records.glob("*.json")] == [f"on_failed-{after.id}"]
    assert deliveries(daemon, before) == []


# -- webhooks --------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 in a thread: records each POST, answers
    with the next status of `answers` (then 200)."""

    def __init__(self, port: int = 0, answers: tuple[int, ...] = ()) -> None:
        self.posts: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self._answers = list(answers)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver._answers.pop(0) if receiver._answers else 200
                receiver.posts.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-receiver")

    def delivered_ids(self) -> list[int]:
        """Job ids of the POSTs answered 2xx, in order."""
        return [int(body["job"]["id"]) for status, _h, body in self.posts if status < 300]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def test_a_webhook_gets_exactly_the_ended_jobs_and_a_500_is_retried(
    daemon_factory: DaemonFactory, speech: SpeechFactory
) -> None:
    with Receiver(answers=(500,)) as receiver:
        daemon = daemon_factory(workers={"max_attempts": 1}, inbox={"webhook_url": receiver.url})
        daemon.start()
        daemon.drop(not_media(daemon, "first.mp3"))
        first = wait_delivered(daemon, "first.mp3", {"webhook"})
        daemon.drop(speech("Please send me the final report before Friday.", "report"))
        done = wait_delivered(daemon, "report.wav", {"webhook"})

        assert receiver.delivered_ids() == [first.id, done.id]
        assert [status for status, _h, _b in receiver.posts] == [500, 200, 200]  # the 500 was retried
        _status, headers, body = receiver.posts[-1]
        assert headers["Content-Type"] == "application/json"
        assert body["job"]["state"] == "done" and body["job"]["source_where"] == "done"
        [hook] = deliveries(daemon, first)
        assert (hook.state, hook.attempts, hook.last_error) == ("delivered", 2, None)
        daemon.wait_for_event(
            "hook.retry", job_id=first.id, kind="webhook", error="HTTP 500 Internal Server Error"
        )
        wait_counted(daemon, {("webhook", "retried"): 1, ("webhook", "delivered"): 2})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_deliveries_owed_when_the_daemon_is_killed_are_made_after_its_restart(
    daemon_database_url: str | None, daemon_factory: DaemonFactory
) -> None:
    port = free_port()  # nobody listens there until the daemon is dead
    daemon = daemon_factory(
        database_url=daemon_database_url,
        workers={"max_attempts": 1},
        inbox={"webhook_url": f"http://127.0.0.1:{port}/hook", "hook_attempts": 100},
    )
    daemon.start()
    names = ["one.mp3", "two.mp3", "three.mp3"]
    for name in names:
        daemon.drop(not_media(daemon, name))

    def all_tried() -> bool:
        jobs = [daemon.job_for(name) for name in names]
        return all(j is not None and any(d.attempts >= 1 for d in deliveries(daemon, j)) for j in jobs)

    daemon.wait_for(all_tried, timeout=120, what="a refused try at each job's webhook")
    daemon.kill()
    ended = {j.id for j in daemon.jobs() if j.state is JobState.FAILED}
    assert len(ended) == 3
    assert all(d.state == "pending" for j in daemon.jobs() for d in deliveries(daemon, j))

    with Receiver(port=port) as receiver:
        daemon.start()
        for name in names:
            wait_delivered(daemon, name, {"webhook"})
        assert set(receiver.delivered_ids()) == ended  # none missed (at least once)


# -- a hanging hook --------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hanging_hook_is_killed_with_its_children_at_its_timeout_and_the_next_one_runs(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    hanger = write_script(tmp_path / "bin", "hang.py", HANGER)
    daemon = daemon_factory(
        workers={"max_attempts": 1},
        inbox={
            "on_failed": [sys.executable, str(hanger), str(records)],
            "hook_timeout_seconds": 3.0,
            "hook_attempts": 1,
        },
    )
    daemon.start()
    daemon.drop(not_media(daemon, "hang.mp3"))
    daemon.wait_for((records / "pids").exists, what="the hanging hook to start")
    pids = [int(p) for p in (records / "pids").read_text().split()]
    assert all(alive(pid) for pid in pids)
    daemon.drop(not_media(daemon, "next.mp3"))
    daemon.wait_for((records / "ran-next.mp3").exists, what="the next job's hook")

    hung = daemon.job_for("hang.mp3")
    assert hung is not None

    def given_up() -> bool:
        return [d.state for d in deliveries(daemon, hung)] == ["failed"]

    daemon.wait_for(given_up, what="the hanging hook's delivery to fail at its timeout")
    [hook] = deliveries(daemon, hung)
    assert hook.last_error is not None and "timed out after 3 s" in hook.last_error
    daemon.wait_for(lambda: not any(alive(pid) for pid in pids), what="the hook and its child gone")
    daemon.wait_for_event("hook.failed", job_id=hung.id, kind="on_failed")
    assert daemon.process is not None and daemon.process.poll() is None  # the daemon stays up
    assert daemon.stop() == 0


# -- refused configs -------------------------------------------------------------------------


@contextmanager
def config_with(tmp_path: Path, models_dir: Path, **inbox: Any) -> Iterator[DaemonUnderTest]:
    daemon = DaemonUnderTest(tmp_path / "cfg", models_dir, inbox=inbox)
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("webhook_url", "file:///etc/passwd", "is not an http:// or https:// URL"),
        ("webhook_url", "ftp://example.org/x", "is not an http:// or https:// URL"),
        ("webhook_url", "http:///no-host", "is not an http:// or https:// URL"),
        ("on_done", [""], "must name a program to run"),
        ("on_failed", [" ", "--flag"], "must name a program to run"),
    ],
)
def test_a_bad_hook_config_is_refused_naming_the_key_and_inbox(
    tmp_path: Path, models_dir: Path, key: str, value: Any, reason: str
) -> None:
    with config_with(tmp_path, models_dir, **{key: value}) as daemon:
        checked = daemon.cli("check-config")
        assert checked.returncode != 0
        assert f"inbox[0].{key}" in checked.stderr and reason in checked.stderr
        assert str(daemon.config_path) in checked.stderr
        if key == "webhook_url":
            assert "inbox 'main'" in checked.stderr
        run = subprocess.run(
            [*WHISPERD, "run", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode != 0 and f"inbox[0].{key}" in run.stdout + run.stderr
        assert not daemon.state_dir.exists()  # refused before it touched anything


def test_sigterm_while_a_hook_runs_leaves_its_delivery_owed(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    hanger = write_script(tmp_path / "bin", "hang.py", HANGER)
    daemon = daemon_factory(
        workers={"max_attempts": 1},
        inbox={"on_failed": [sys.executable, str(hanger), str(records)], "hook_attempts": 1},
    )
    daemon.start()
    daemon.drop(not_media(daemon, "hang.mp3"))
    daemon.wait_for((records / "pids").exists, what="the hook to start")
    pids = [int(p) for p in (records / "pids").read_text().split()]
    assert daemon.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids[:1])  # the hook itself was killed and reaped
    job = daemon.job_for("hang.mp3")
    assert job is not None
    [hook] = deliveries(daemon, job)
    assert hook.state == "pending"  # tried again at the next start, not given up


# --------------------------------------------------------------------------- one try, one deadline


@contextmanager
def trickling_receiver(stop: threading.Event) -> Iterator[str]:
    """An HTTP server that answers one byte every 0.2 s, forever: each socket
    read succeeds in time, so only a deadline for the whole try ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.2):
                    return
                connection.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        stop.set()
        listener.close()
        thread.join(10)


def test_a_webhook_answering_byte_by_byte_is_given_up_at_the_hook_timeout() -> None:
    from whisperd.hooks.delivery import post_webhook

    stop = threading.Event()
    with trickling_receiver(stop) as url:
        result = post_webhook(url, document=b"{}", kind="webhook", timeout=1.0)
    assert result.error == f"timed out after 1 s waiting for {url}"


def test_a_receiver_that_breaks_http_is_a_failed_try_not_a_crash() -> None:
    from whisperd.hooks.delivery import post_webhook

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def garbage() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"this is not HTTP at all\r\n\r\n")

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    try:
        result = post_webhook(f"http://127.0.0.1:{port}/", document=b"{}", kind="webhook", timeout=10.0)
    finally:
        thread.join(10)
        listener.close()
    assert result.error is not None and result.error.startswith(f"cannot reach http://127.0.0.1:{port}/")
