"""The operator's commands: show, retry, pause, resume.

Each handler takes the parsed arguments and the loaded config and returns the
exit status; cli/commands.py registers them and turns whisperd's errors into exit
statuses 1-3. The statuses below are the ones a script can rely on besides.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from whisperd.cli.terminal import say
from whisperd.config import Config
from whisperd.jobs import FileIdentity, Job, JobState
from whisperd.store import report as job_report

if TYPE_CHECKING:  # imported late at run time: CLI start-up stays fast
    from whisperd.store.job_store import JobStore

# No job with that id, or no inbox of that name in the config.
NOT_FOUND_EXIT = 4
# The job is not in a state the command acts on (retry: still queued, running or done).
WRONG_STATE_EXIT = 5
# retry: the job's file is gone, or another file took its place in the inbox.
SOURCE_UNAVAILABLE_EXIT = 6


def print_json(document: Any) -> None:
    # ensure_ascii: control characters in names come out escaped, never raw.
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def open_store(config: Config, *, read_only: bool) -> JobStore:
    # Imported here, not at the top: the CLI starts fast; read-only for the
    # reading commands, which group members may run.
    from whisperd.store.job_store import JobStore

    if read_only:  # show: group members may only read the state folder
        return JobStore.open_read_only(config.database_url)
    return JobStore.open(
        config.database_url, busy_timeout_seconds=config.daemon.database_busy_timeout_seconds
    )


def _when(moment: float | None) -> str:
    return "-" if moment is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


# -- show ------------------------------------------------------------------------


def cmd_show(config: Config, job_id: int, *, as_json: bool) -> int:
    store: JobStore = open_store(config, read_only=True)
    try:
        job = store.get(job_id)
        if job is None:
            say(f"whisperd: no job {job_id}", file=sys.stderr)
            return NOT_FOUND_EXIT
        attempts = store.attempts_of(job_id)
        stuck = store.source_stuck_reason(job_id) if job.disposed_at is None else None
        hooks = store.hook_deliveries_of(job_id)
    finally:
        store.close()
    document = job_report.show_document(job, attempts, stuck, hooks)
    if as_json:
        print_json(document)
    else:
        say(*_show_lines(document))
    return 0


def _show_lines(document: dict[str, Any]) -> list[str]:
    job = document["job"]
    lines = [
        f"job {job['id']}  {job['state']}  {job['inbox']}/{job['file']}",
        f"  model {job['model']}, priority {job['priority']}, "
        f"attempts {job['attempts']} of {job['max_attempts']}",
        f"  queued    {_when(job['created_at'])}",
    ]
    for attempt in document["history"]:
        took = "" if attempt["seconds"] is None else f" ({attempt['seconds']:.1f}s)"
        error = f": {attempt['error']}" if attempt["error"] else ""
        lines.append(
            f"  attempt {attempt['attempt']}  {_when(attempt['started_at'])} -> {_when(attempt['ended_at'])}"
            f"{took}  {attempt['worker']} on {attempt['device']}  {attempt['outcome']}{error}"
            + ("" if attempt["counted"] else "  (handed back, not counted)")
        )
    if not document["history"] and job["attempts"]:
        lines.append(f"  ({job['attempts']} attempt(s) before this store kept a history)")
    if job["state"] == JobState.RUNNING.value:
        eta = "?" if job["eta_seconds"] is None else f"{job['eta_seconds']:.0f}s"
        lines.append(f"  progress  {job['progress'] * 100:.1f}%, eta {eta}")
    if job["decoding_started_at"] is not None:
        lines.append(f"  decoding  {_when(job['decoding_started_at'])}{_decoding_speed(job)}")
    if job["finished_at"] is not None:
        lines.append(f"  ended     {_when(job['finished_at'])}")
    if job["error"]:
        lines.append(f"  error     {job['error']}")
    lines.extend(f"  output    {path}" for path in job["outputs"])
    where = job["source_where"]
    lines.append(f"  source    {where}" + (f"  {job['source_now']}" if job["source_now"] else ""))
    if document["source_stuck_reason"]:
        lines.append(f"  stuck     {document['source_stuck_reason']}")
    for hook in document["hooks"]:
        error = f": {hook['error']}" if hook["error"] else ""
        tries = f"{hook['attempts']} {'try' if hook['attempts'] == 1 else 'tries'}"
        lines.append(f"  hook      {hook['kind']}  {hook['state']} after {tries}{error}")
    return lines


def _decoding_speed(job: dict[str, Any]) -> str:
    if job["decoding_seconds"] is None or job["decoding_realtime_factor"] is None:
        return ""
    return f" ({job['decoding_seconds']:.1f}s, {job['decoding_realtime_factor']:.2f} s per audio second)"


# -- retry -----------------------------------------------------------------------


def cmd_retry(config: Config, job_id: int) -> int:
    store: JobStore = open_store(config, read_only=False)
    try:
        return _retry(store, config, job_id)
    finally:
        store.close()


def _retry(store: JobStore, config: Config, job_id: int) -> int:
    job = store.get(job_id)
    if job is None:
        say(f"whisperd: no job {job_id}", file=sys.stderr)
        return NOT_FOUND_EXIT
    if not job.state.is_active and job.disposed_at is None and store.source_stuck_reason(job.id):
        store.forget_move_failures(job.id)
        say(f"job {job.id}: its source move is tried again at the daemon's next sweep")
        return 0
    place = job_report.source_place(job)
    refused = _refusal(job, place)
    if refused is not None:
        say(f"whisperd: job {job.id}: {refused[1]}", file=sys.stderr)
        return refused[0]
    assert place.path is not None  # _refusal says when it is gone
    moved_from = None if place.path == job.source else place.path
    if moved_from is not None:
        problem = _move_back(job, moved_from)
        if problem is not None:
            say(f"whisperd: job {job.id}: {problem}", file=sys.stderr)
            return SOURCE_UNAVAILABLE_EXIT
    after = store.requeue_ended(
        job.id,
        expected=job.state,
        identity=FileIdentity.of(job.source),
        extra_attempts=config.workers.max_attempts,
    )
    if after is None:
        if moved_from is not None:  # leave things as they were
            os.rename(job.source, moved_from)
        say(
            f"whisperd: job {job.id} changed meanwhile, or another job is active for "
            f"{job.spec.inbox}/{job.spec.rel_path}; nothing retried",
            file=sys.stderr,
        )
        return WRONG_STATE_EXIT
    _remove_error_note(job)
    back = f"; {moved_from} moved back to {job.source}" if moved_from else ""
    say(f"job {job.id} queued again (attempt {after.attempts + 1} of {after.max_attempts}){back}")
    return 0


def _refusal(job: Job, place: job_report.SourcePlace) -> tuple[int, str] | None:
    """(exit status, reason) when the job cannot be retried as it is."""
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        return WRONG_STATE_EXIT, f"it is {job.state.value}; only failed or cancelled jobs can be retried"
    if place.path is None:
        last = job.disposed_to or job.source
        return SOURCE_UNAVAILABLE_EXIT, f"its file is gone (last at {last}); drop it into the inbox again"
    return None


def _move_back(job: Job, moved_from: str) -> str | None:
    """Move the job's file from done/failed/cancel back to its inbox path;
    the reason it cannot, or None."""
    from whisperd.errors import OutputError
    from whisperd.files.outputs import move_source

    if os.path.lexists(job.source):
        return f"another file is at {job.source}; move it away first"
    try:
        back = move_source(moved_from, job.spec.inbox_root, job.spec.rel_path)
    except (OutputError, ValueError) as exc:
        return str(exc)
    if back != job.source:  # a file arrived at that name meanwhile
        os.rename(back, moved_from)
        return f"another file arrived at {job.source}; move it away first"
    return None


def _remove_error_note(job: Job) -> None:
    note = os.path.join(job.spec.failed_dir, job.spec.rel_path + ".error.txt")
    if job.spec.failed_dir and os.path.lexists(note):
        os.unlink(note)


# -- pause / resume --------------------------------------------------------------


def _inbox_names(config: Config, inbox: str | None) -> list[str] | None:
    names = [i.name for i in config.inboxes]
    if inbox is None:
        return names
    return [inbox] if inbox in names else None


def cmd_pause(config: Config, inbox: str | None, *, pause: bool) -> int:
    names = _inbox_names(config, inbox)
    if names is None:
        known = ", ".join(i.name for i in config.inboxes)
        say(f"whisperd: no inbox named {inbox} in {config.source} (inboxes: {known})", file=sys.stderr)
        return NOT_FOUND_EXIT
    store: JobStore = open_store(config, read_only=False)
    try:
        for name in names:
            changed = store.pause_inbox(name) if pause else store.resume_inbox(name)
            if pause:
                done = f"inbox {name} paused: its queued jobs wait; running ones finish"
                say(done if changed else f"inbox {name} was paused already")
            else:
                say(f"inbox {name} resumed" if changed else f"inbox {name} was not paused")
    finally:
        store.close()
    return 0
