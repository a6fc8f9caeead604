"""Logging as the journal and an operator at a terminal see it."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog
from structlog.testing import capture_logs

from whisperd import logs
from whisperd.jobs import FileIdentity, Job, JobSpec, JobState


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def make_job() -> Job:
    spec = JobSpec(
        inbox="meetings", inbox_root="/srv/transcribe/inbox", rel_path="2024/talk.mp3", model="tiny.en"
    )
    identity = FileIdentity(device=1, inode=2, size=3, mtime_ns=4)
    return Job(
        id=17, spec=spec, identity=identity, state=JobState.RUNNING, attempts=1, max_attempts=3, not_before=0
    )


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_job_events_carry_job_id_inbox_and_file() -> None:
    log = logs.get_logger("whisperd.workers.worker")
    with capture_logs() as events:
        log.info("job.done", **logs.job_fields(make_job()), seconds=1.5)
    assert events == [
        {
            "event": "job.done",
            "job_id": 17,
            "inbox": "meetings",
            "file": "2024/talk.mp3",
            "seconds": 1.5,
            "log_level": "info",
        }
    ]


def test_a_non_terminal_stream_gets_one_json_object_per_line() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    logs.get_logger("whisperd.daemon.root").info("daemon.ready", inboxes=2, note="multi\nline")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger("whisperd.workers.worker").exception("job.failed", job_id=17, inbox="meetings")

    ready, failed = json_lines(stream)
    assert ready["event"] == "daemon.ready" and ready["level"] == "info" and ready["inboxes"] == 2
    assert ready["logger"] == "whisperd.daemon.root" and ready["note"] == "multi\nline"
    timestamp = datetime.fromisoformat(str(ready["timestamp"]).replace("Z", "+00:00"))
    assert timestamp.utcoffset() is not None and timestamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert failed["level"] == "error" and failed["job_id"] == 17
    assert "RuntimeError: boom" in str(failed["exception"])


def test_stdlib_loggers_come_out_in_the_same_format() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    logging.getLogger("watchdog.observers.inotify_buffer").warning("queue overflow on %s", "/srv/inbox")
    (line,) = json_lines(stream)
    assert line["event"] == "queue overflow on /srv/inbox"
    assert line["level"] == "warning" and line["logger"] == "watchdog.observers.inotify_buffer"
    assert "timestamp" in line


def test_python_warnings_become_log_lines() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    import warnings

    warnings.warn("FP16 is not supported on CPU; using FP32 instead", UserWarning, stacklevel=1)
    (line,) = json_lines(stream)
    assert "FP16 is not supported on CPU" in str(line["event"]) and line["level"] == "warning"


def test_the_level_filters_both_kinds_of_logger() -> None:
    stream = io.StringIO()
    logs.configure("WARNING", stream=stream)
    logs.get_logger("whisperd.x").info("job.queued")
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    logs.get_logger("whisperd.x").warning("job.retry")
    assert [line["event"] for line in json_lines(stream)] == ["job.retry"]


def test_configuring_again_replaces_the_old_setup() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("info", stream=first)
    logs.get_logger("whisperd.x").info("config.reloaded")
    logs.configure("debug", stream=second)
    logs.get_logger("whisperd.x").debug("model.loaded")
    assert [line["event"] for line in json_lines(first)] == ["config.reloaded"]
    assert [line["event"] for line in json_lines(second)] == ["model.loaded"]


def test_a_terminal_gets_the_readable_console_format() -> None:
    controller, terminal_fd = os.openpty()
    try:
        with os.fdopen(terminal_fd, "w", closefd=True) as terminal:
            logs.configure("info", stream=terminal)
            logs.get_logger("whisperd.daemon.root").info("daemon.ready", inboxes=2)
            terminal.flush()
            output = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
    assert "daemon.ready" in output and "inboxes" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.strip())


def test_the_console_format_can_be_chosen_explicitly() -> None:
    stream = io.StringIO()
    logs.configure("info", json=False, stream=stream)
    logs.get_logger("whisperd.x").info("worker.started", slot="cuda:0/0")
    text = stream.getvalue()
    assert "worker.started" in text and not text.lstrip().startswith("{")


def test_a_bad_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'loud'.*debug, info, warning, error, critical"):
        logs.configure("loud", stream=io.StringIO())


def test_a_bound_logger_keeps_its_fields_on_every_event() -> None:
    # The worker binds job_id/inbox/file once per job and logs several events.
    logs.configure("info", stream=io.StringIO())
    log = logs.get_logger("whisperd.workers.worker").bind(
        job_id=17, inbox="meetings", file="/srv/in/talk.mp3"
    )
    with capture_logs() as events:
        log.info("job.claimed", device="cpu")
        log.info("job.done", seconds=1.5)
    assert [(e["event"], e["job_id"], e["inbox"], e["log_level"]) for e in events] == [
        ("job.claimed", 17, "meetings", "info"),
        ("job.done", 17, "meetings", "info"),
    ]


def test_the_console_format_shows_the_level_and_the_logger() -> None:
    stream = io.StringIO()
    logs.configure("info", json=False, stream=stream)
    logs.get_logger("whisperd.watch.watcher").warning("watcher.rescan", found=3)
    text = stream.getvalue()
    assert "warn" in text.lower() and "whisperd.watch.watcher" in text and "found" in text
