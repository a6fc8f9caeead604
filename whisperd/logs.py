"""Logging setup: structlog for whisperd, stdlib logging routed through it.

Logs go to stdout, which systemd hands to the journal; a stream that is not a terminal
gets one JSON object per line; a terminal gets a readable, coloured console
format. Both carry an ISO-8601 UTC timestamp, the level, the logger name and
the event name.

Event names are dotted nouns (`job.done`, `model.loaded`).

Each process sets logging up once with `configure()`; worker processes are
started with the spawn method and must call it again themselves.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from whisperd.jobs import Job

# Accepted values of `configure(level=...)` (and of the config's log level).
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Name given to the root handler configure() installs, so that a second call
# replaces it instead of printing every line twice.
_HANDLER_NAME = "whisperd"


def configure(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging to `stream` (stdout by default).

    level: one of LEVELS, any case. json: True for JSON lines, False for the
    console format, None to pick JSON unless the stream is a terminal.
    Calling it again replaces the earlier setup.
    """
    numeric_level = _parse_level(level)
    target = sys.stdout if stream is None else stream
    use_json = not _is_terminal(target) if json is None else json

    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure() (tests, a reload with a new level)
        # must reach loggers that were already used.
        cache_logger_on_first_use=False,
    )
    _install_root_handler(target, numeric_level, _renderer(use_json))
    # watchdog logs every inotify event at debug level: far too much to keep.
    logging.getLogger("watchdog").setLevel(max(numeric_level, logging.INFO))
    # faster-whisper logs "Processing audio with duration ..." per file at
    # info; whisperd's own job events say the same, with the job's fields.
    logging.getLogger("faster_whisper").setLevel(max(numeric_level, logging.WARNING))
    # Python warnings (torch's, whisper's "FP16 is not supported on CPU")
    # become log lines instead of raw text on stderr.
    logging.captureWarnings(True)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger named after its module (`get_logger(__name__)`)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def job_fields(job: Job) -> dict[str, Any]:
    """The fields every job event carries: `log.info("job.done", **job_fields(job))`.
    `file` is the path inside the inbox (what `whisperd jobs` shows), never
    the absolute source path."""
    return {"job_id": job.id, "inbox": job.spec.inbox, "file": job.spec.rel_path}


def _parse_level(level: str) -> int:
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        choices = ", ".join(LEVELS)
        raise ValueError(f"log level {level!r} is not one of: {choices}") from None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def _shared_processors() -> list[structlog.typing.Processor]:
    """Run on every event, whether it came from structlog or stdlib logging."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(use_json: bool) -> list[structlog.typing.Processor]:
    if use_json:
        # Tracebacks become one string field, so a line stays one JSON object.
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return [structlog.dev.ConsoleRenderer()]


def _install_root_handler(stream: TextIO, level: int, renderer: list[structlog.typing.Processor]) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from stdlib loggers (watchdog, sqlalchemy...) get the same
        # fields as structlog's own events before rendering.
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
