"""Command line: whisperd run | status | jobs | cancel | retry | check-config |
models | doctor (layer L4)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from whisperd import __version__
from whisperd.config import Config, load_config
from whisperd.errors import ConfigError, WhisperdError
from whisperd.jobs import Job, JobState

DEFAULT_CONFIG = os.environ.get("WHISPERD_CONFIG", "config.toml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"whisperd: config error: {exc}", file=sys.stderr)
        return 2
    except WhisperdError as exc:
        print(f"whisperd: {exc}", file=sys.stderr)
        return 1


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

    command("run", cmd_run, "run the daemon in the foreground (systemd runs this)")
    command("status", cmd_status, "the queue and each running job's progress")
    jobs = command("jobs", cmd_jobs, "recent jobs")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.add_argument("--state", choices=[s.value for s in JobState], action="append")
    cancel = command("cancel", cmd_cancel, "cancel a job by id or by the path of its file")
    cancel.add_argument("target", help="job id, or the path of the file")
    retry = command("retry", cmd_retry, "run a failed or cancelled job again")
    retry.add_argument("job_id", type=int)
    command("check-config", cmd_check_config, "validate the config and print the effective config")
    command("doctor", cmd_doctor, "check ffmpeg, devices, models, folders and database; say what to fix")
    models = command(
        "models", lambda a: (parser.parse_args(["models", "--help"]), 2)[1], "list or import models"
    )
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
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _open_store(config: Config):  # type: ignore[no-untyped-def]  # JobStore, imported late: CLI start-up stays fast
    from whisperd.queue_db import JobStore

    return JobStore.open(config.database_url)


# -- run / check-config ----------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from whisperd.daemon import run_daemon

    return run_daemon(_config(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"# effective config of {config.source}: OK")
    print(_to_toml(config.to_dict()))
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
    store = _open_store(config)
    try:
        counts = store.counts()
        print("queue: " + ", ".join(f"{s.value} {counts.get(s, 0)}" for s in JobState))
        running = store.list_jobs(states=[JobState.RUNNING], limit=1000)
        queued = store.list_jobs(states=[JobState.QUEUED], limit=10)
        now = time.time()
        for job in running:
            elapsed = now - (job.started_at or now)
            eta = "?" if job.eta_seconds is None else _duration(job.eta_seconds)
            cancel = "  (cancelling)" if job.cancel_requested else ""
            print(
                f"  #{job.id:<6} {_bar(job.progress)} {job.progress * 100:5.1f}%"
                f"  elapsed {_duration(elapsed)}"
                f"  eta {eta}  {job.device or '?'}  {job.spec.inbox}/{job.spec.rel_path}{cancel}"
            )
        for job in queued:
            print(
                f"  #{job.id:<6} queued  {job.spec.inbox}/{job.spec.rel_path}"
                f"{'  (retry #' + str(job.attempts + 1) + ')' if job.attempts else ''}"
            )
    finally:
        store.close()
    return 0


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _open_store(config)
    try:
        states = [JobState(s) for s in args.state] if args.state else None
        jobs = store.list_jobs(states=states, limit=args.limit)
    finally:
        store.close()
    print(f"{'ID':>6}  {'STATE':<9} {'TRIES':>5} {'TOOK':>8} {'RTF':>6}  {'DEVICE':<7} FILE")
    for job in jobs:
        print(_job_line(job))
        if job.state in (JobState.FAILED, JobState.CANCELLED) and job.last_error:
            print(f"{'':>8}{job.last_error}")
    return 0


def _job_line(job: Job) -> str:
    took = rtf = ""
    if job.started_at and job.finished_at:
        seconds = job.finished_at - job.started_at
        took = f"{seconds:.1f}s"
        if job.audio_seconds:
            rtf = f"{seconds / job.audio_seconds:.2f}"
    return (
        f"{job.id:>6}  {job.state.value:<9} {job.attempts:>2}/{job.max_attempts:<2} {took:>8} {rtf:>6}  "
        f"{job.device or '-':<7} {job.spec.inbox}/{job.spec.rel_path}"
    )


def cmd_cancel(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _open_store(config)
    try:
        jobs = _jobs_for_target(store, args.target)
        if not jobs:
            print(f"no queued or running job for {args.target}")
            return 1
        for job in jobs:
            after = store.request_cancel(job.id, reason="cancelled with whisperd cancel")
            if after is None:
                continue
            if not job.state.is_active:  # ended before this call: say so, never "cancelled"
                print(f"job {after.id} already {after.state.value}; nothing to cancel")
            elif after.state is JobState.CANCELLED:
                print(f"job {after.id} cancelled ({after.spec.rel_path})")
            elif after.state is JobState.RUNNING:
                print(f"job {after.id} is running; it stops within seconds ({after.spec.rel_path})")
            else:
                print(f"job {after.id} already {after.state.value}; nothing to cancel")
    finally:
        store.close()
    return 0


def _jobs_for_target(store, target: str) -> list[Job]:  # type: ignore[no-untyped-def]
    if target.isdigit():
        job = store.get(int(target))
        return [job] if job is not None else []
    path = os.path.abspath(target)
    jobs: list[Job] = [j for j in store.find_by_source(path) if j.state.is_active]
    return jobs


def cmd_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _open_store(config)
    try:
        job = store.get(args.job_id)
        if job is None:
            print(f"no job {args.job_id}")
            return 1
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            print(f"job {job.id} is {job.state.value}; only failed or cancelled jobs can be retried")
            return 1
        where = job.disposed_to
        if not where or not os.path.exists(where):
            print(
                f"job {job.id}: its file is no longer at {where or 'a known place'}; "
                "drop it into the inbox again"
            )
            return 1
        from whisperd.outputs import move_source

        back = move_source(where, job.spec.inbox_root, job.spec.rel_path)
        note = os.path.join(job.spec.failed_dir, job.spec.rel_path + ".error.txt")
        if os.path.exists(note):
            os.unlink(note)
        print(f"job {job.id}: {where} moved back to {back}; the daemon queues it as a new job")
    finally:
        store.close()
    return 0


# -- models ---------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    from whisperd.models import list_models

    config = _config(args)
    found = list_models(config.models.folder)
    if not found:
        print(f"no models in {config.models.folder}; import one with: whisperd models import PATH")
        return 0
    for info in found:
        default = "  (default)" if info.name == config.models.default else ""
        print(f"{info.name:<20} {info.size_bytes / 1e6:8.1f} MB  {info.path}{default}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from whisperd.checkpoints import import_model

    config = _config(args)
    info = import_model(args.path, config.models.folder, args.name)
    print(f"imported {info.name} -> {info.path} ({info.size_bytes / 1e6:.1f} MB)")
    return 0


# -- doctor ---------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from whisperd.doctor import run_checks

    config = _config(args)
    problems = 0
    for check in run_checks(config):
        mark = "ok  " if check.ok else "FAIL"
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            problems += 1
            if check.fix:
                print(f"       fix: {check.fix}")
    print("all checks passed" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
