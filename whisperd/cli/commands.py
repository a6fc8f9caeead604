"""Command line: whisperd run | status | jobs | show | cancel | retry | pause |
resume | check-config | models | doctor. The operator's commands
(show, retry, pause, resume) live in cli/operator.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from whisperd import __version__, crash_points
from whisperd.cli import operator as operator_cli
from whisperd.cli import status as cli_status
from whisperd.cli.status import duration
from whisperd.cli.terminal import say
from whisperd.config import Config
from whisperd.config_load import load_config
from whisperd.errors import ConfigError, StoreUnavailable, WhisperdError
from whisperd.jobs import Job, JobState
from whisperd.store import report as job_report

if TYPE_CHECKING:  # the store's modules load late: CLI start-up stays fast
    from whisperd.store.job_store import JobStore

DEFAULT_CONFIG = os.environ.get("WHISPERD_CONFIG", "config.toml")
# Exit status when the job store cannot be reached (distinct from 1: other errors, 2: config).
STORE_UNREACHABLE_EXIT = 3
# `whisperd reload` gives up after this long (below the unit's TimeoutSec for ExecReload).
RELOAD_WAIT_SECONDS = 60.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        say(f"whisperd: config error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        say(f"whisperd: {exc}", file=sys.stderr)
        return STORE_UNREACHABLE_EXIT
    except WhisperdError as exc:
        say(f"whisperd: {exc}", file=sys.stderr)
        return 1


# Adds one subcommand (name, handler, help) with its --config option; returns its parser.
_Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperd", description="Transcription daemon for openai-whisper.")
    parser.add_argument("--version", action="version", version=f"whisperd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
        p.set_defaults(handler=handler)
        return p

    run = command("run", cmd_run, "run the daemon in the foreground (systemd runs this)")
    # The crash-recovery tests' hook (WorkerSettings.crash_point): not for users.
    run.add_argument(
        "--crash-point", default="", choices=crash_points.ALL, metavar="POINT", help=argparse.SUPPRESS
    )
    _add_store_commands(command)
    command(
        "reload", cmd_reload, "make the running daemon re-read its config; wait until it has (ExecReload)"
    )
    command("check-config", cmd_check_config, "validate the config and print the effective config")
    command("doctor", cmd_doctor, "check ffmpeg, devices, models, folders and database; say what to fix")
    models = command(
        "models", lambda a: (parser.parse_args(["models", "--help"]), 2)[1], "list or import models"
    )
    _add_models_commands(models)
    return parser


def _add_store_commands(command: _Command) -> None:
    """The commands that read or change the job store: status, jobs, show,
    cancel, retry, pause, resume."""
    json_help = "print one JSON document (field names: README, Machine-readable output)"
    status = command("status", cmd_status, "the queue and each running job's progress")
    status.add_argument("--json", action="store_true", help=json_help)
    jobs = command("jobs", cmd_jobs, "recent jobs")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.add_argument("--state", choices=[s.value for s in JobState], action="append")
    jobs.add_argument("--json", action="store_true", help=json_help)
    show = command("show", cmd_show, "one job's whole history: attempts, outputs, where its file is")
    show.add_argument("job_id", type=int)
    show.add_argument("--json", action="store_true", help=json_help)
    cancel = command("cancel", cmd_cancel, "cancel a job by id or by the path of its file")
    cancel.add_argument("target", help="job id, or the path of the file")
    retry = command(
        "retry", cmd_retry, "queue a failed or cancelled job again, its file moved back into the inbox"
    )
    retry.add_argument("job_id", type=int)
    pause = command("pause", cmd_pause, "stop starting the queued jobs of an inbox (all: no name)")
    pause.add_argument("inbox", nargs="?")
    resume = command("resume", cmd_resume, "start the queued jobs of a paused inbox again (all: no name)")
    resume.add_argument("inbox", nargs="?")


def _add_models_commands(models: argparse.ArgumentParser) -> None:
    """models list | models import PATH [--name NAME]."""
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="models in the models folder")
    listing.set_defaults(handler=cmd_models_list)
    importing = models_sub.add_parser(
        "import", help="import an openai-whisper .pt or a CTranslate2 Whisper folder into the models folder"
    )
    importing.add_argument("path")
    importing.add_argument("--name", help="model name (default: from the file or the model's dimensions)")
    importing.set_defaults(handler=cmd_models_import)
    for p in (listing, importing):
        p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


# -- run / check-config ----------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from whisperd.daemon.root import run_daemon

    return run_daemon(_config(args), crash_point=args.crash_point)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    say(f"# effective config of {config.source}: OK")
    say(*_to_toml(config.to_dict()).splitlines())
    return 0


def _to_toml(data: dict[str, object]) -> str:
    lines: list[str] = []
    for section, values in data.items():
        tables = values if isinstance(values, list) else [values]
        for table in tables:
            lines.append(f"\n[[{section}]]" if isinstance(values, list) else f"\n[{section}]")
            assert isinstance(table, dict)
            lines.extend(f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in table.items())
    return "\n".join(lines).strip() + "\n"


# -- status / jobs / cancel / retry --------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    store: JobStore = operator_cli.open_store(config, read_only=True)
    try:
        reads = cli_status.read_status(store)
    finally:
        store.close()
    # Each daemon is judged by the lease it registered with; this config's
    # only for a row an older version wrote.
    stale_after = config.workers.lease_seconds
    if args.json:
        operator_cli.print_json(reads.document(stale_after))
    else:
        say(*reads.lines(stale_after, configured={i.name for i in config.inboxes}))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _config(args)
    store: JobStore = operator_cli.open_store(config, read_only=True)
    try:
        states = [JobState(s) for s in args.state] if args.state else None
        jobs = store.list_jobs(states=states, limit=args.limit)
    finally:
        store.close()
    if args.json:
        document = {
            "version": job_report.JSON_FORMAT_VERSION,
            "jobs": [job_report.job_document(j) for j in jobs],
        }
        operator_cli.print_json(document)
        return 0
    say(f"{'ID':>6}  {'STATE':<9} {'TRIES':>5} {'TOOK':>8} {'RTF':>6}  {'DEVICE':<7} FILE")
    for job in jobs:
        say(_job_line(job))
        if job.state in (JobState.FAILED, JobState.CANCELLED) and job.last_error:
            say(f"{'':>8}{job.last_error}")
    return 0


def _job_line(job: Job) -> str:
    took = rtf = ""
    if job.started_at and job.finished_at:
        seconds = job.finished_at - job.started_at
        took = f"{seconds:.1f}s"
        if job.audio_seconds:
            rtf = f"{seconds / job.audio_seconds:.2f}"
    elif job.state is JobState.RUNNING and job.eta_seconds is not None:
        took = f"eta {duration(job.eta_seconds)}"  # a running job's TOOK is still to come
    return (
        f"{job.id:>6}  {job.state.value:<9} {job.attempts:>2}/{job.max_attempts:<2} {took:>8} {rtf:>6}  "
        f"{job.device or '-':<7} {job.spec.inbox}/{job.spec.rel_path}"
    )


def cmd_cancel(args: argparse.Namespace) -> int:
    config = _config(args)
    store: JobStore = operator_cli.open_store(config, read_only=False)
    try:
        jobs = _jobs_for_target(store, args.target)
        if not jobs:
            say(f"no queued or running job for {args.target}")
            return 1
        for job in jobs:
            after = store.request_cancel(job.id, reason="cancelled with whisperd cancel")
            if after is None:
                continue
            if not job.state.is_active:  # ended before this call: say so, never "cancelled"
                say(f"job {after.id} already {after.state.value}; nothing to cancel")
            elif after.state is JobState.CANCELLED:
                say(f"job {after.id} cancelled ({after.spec.rel_path})")
            elif after.state is JobState.RUNNING:
                say(f"job {after.id} is running; it stops within seconds ({after.spec.rel_path})")
            else:
                say(f"job {after.id} already {after.state.value}; nothing to cancel")
    finally:
        store.close()
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from whisperd.daemon import reloading

    config = _config(args)
    problem = reloading.reload_and_wait(config.daemon.state_dir, timeout=RELOAD_WAIT_SECONDS)
    if problem is not None:
        say(f"whisperd: {problem}", file=sys.stderr)
        return 1
    say("reloaded (the journal says what changed: config.reloaded or config.reload_failed)")
    return 0


def _jobs_for_target(store: JobStore, target: str) -> list[Job]:
    if target.isdigit():
        job = store.get(int(target))
        return [job] if job is not None else []
    path = os.path.abspath(target)
    jobs: list[Job] = [j for j in store.find_by_source(path) if j.state.is_active]
    return jobs


def cmd_retry(args: argparse.Namespace) -> int:
    return operator_cli.cmd_retry(_config(args), args.job_id)


def cmd_show(args: argparse.Namespace) -> int:
    return operator_cli.cmd_show(_config(args), args.job_id, as_json=args.json)


def cmd_pause(args: argparse.Namespace) -> int:
    return operator_cli.cmd_pause(_config(args), args.inbox, pause=True)


def cmd_resume(args: argparse.Namespace) -> int:
    return operator_cli.cmd_pause(_config(args), args.inbox, pause=False)


# -- models ---------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    from whisperd.models.locate import FASTER_WHISPER, list_models, model_location

    config = _config(args)
    found = list_models(config.models.folder)
    # The bundled tiny.en serves faster-whisper from its package, imported or not.
    bundled = model_location(config.models.folder, "tiny.en", FASTER_WHISPER)
    bundled_line = bundled is not None and not any(
        m.name == "tiny.en" and FASTER_WHISPER in m.engines for m in found
    )
    if not found and not bundled_line:
        say(f"no models in {config.models.folder}; import one with: whisperd models import PATH")
        return 0
    for info in found:
        default = "  (default)" if info.name == config.models.default else ""
        engines = ",".join(info.engines)
        say(f"{info.name:<20} {info.size_bytes / 1e6:8.1f} MB  {engines:<30} {info.path}{default}")
    if bundled_line:
        default = "  (default)" if config.models.default == "tiny.en" else ""
        say(f"{'tiny.en':<20} {'':>8}     {FASTER_WHISPER:<30} {bundled} (bundled package){default}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from whisperd.models.checkpoints import import_model

    config = _config(args)
    info = import_model(args.path, config.models.folder, args.name)
    say(f"imported {info.name} -> {info.path} ({info.size_bytes / 1e6:.1f} MB)")
    if info.ct2_folder:
        say(f"kept its CTranslate2 folder for faster-whisper -> {info.ct2_folder}")
    say(f"engines: {', '.join(info.engines)}")
    return 0


# -- doctor ---------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from whisperd.cli.doctor import run_checks

    config = _config(args)
    problems = 0
    for check in run_checks(config):
        mark = "ok  " if check.ok else "FAIL"
        say(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            problems += 1
            if check.fix:
                say(f"       fix: {check.fix}")
    say("all checks passed" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1
