"""`whisperd doctor`: checks that say what to fix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from whisperd.config import Config
from whisperd.devices.nvml import NvmlProbe
from whisperd.errors import ModelImportError
from whisperd.media import tool as media_tool
from whisperd.models import locate as models


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    ok: bool
    detail: str
    # What the user should do when the check fails.
    fix: str = ""


def run_checks(config: Config) -> Iterator[Check]:
    yield _ffmpeg()
    yield _devices(config)
    yield from _models(config)
    yield from _folders(config)
    yield _database(config)


def _ffmpeg() -> Check:
    ok, detail = media_tool.ffmpeg_available()
    return Check(
        name="ffmpeg", ok=ok, detail=detail, fix="" if ok else "install ffmpeg (apt-get install ffmpeg)"
    )


def _devices(config: Config) -> Check:
    probe = NvmlProbe()
    gpus = probe.devices()
    wanted = config.workers.devices
    if gpus:
        names = ", ".join(f"{d.index}: {d.name} ({d.memory_total_bytes / 2**30:.0f} GiB)" for d in gpus)
        return Check(name="devices", ok=True, detail=f"{len(gpus)} GPU(s): {names}")
    if isinstance(wanted, tuple):
        return Check(
            name="devices",
            ok=False,
            detail=f"config asks for GPUs {list(wanted)} but NVML sees none "
            f"({probe.start_error or 'no devices'})",
            fix='install the NVIDIA driver, or set [workers] devices = "auto" or "cpu"',
        )
    return Check(name="devices", ok=True, detail=f"no GPU ({probe.start_error or 'none found'}); CPU workers")


def _models(config: Config) -> Iterator[Check]:
    """Each model an inbox names, for the engine that inbox runs it on, found
    where that engine's worker will look (models.model_location)."""
    folder = config.models.folder
    needed = {(config.models.default, config.models.engine)} | {
        (i.model or config.models.default, i.engine) for i in config.inboxes
    }
    for name, engine in sorted(needed):
        label = f"model {name}" if engine == models.OPENAI_WHISPER else f"model {name} ({engine})"
        try:
            source = models.model_location(folder, name, engine)
        except ModelImportError as exc:
            yield Check(
                name=label, ok=False, detail=str(exc), fix="give the model a plain name in the config"
            )
            continue
        if source is not None:
            yield Check(name=label, ok=True, detail=f"available ({source})")
        elif engine == models.FASTER_WHISPER:
            yield Check(
                name=label,
                ok=False,
                detail=f"no CTranslate2 folder {name}{models.CT2_SUFFIX} in {folder}",
                fix=f"whisperd models import CT2_FOLDER --name {name}  "
                "(a folder with model.bin, config.json, tokenizer.json)",
            )
        else:
            yield Check(
                name=label,
                ok=False,
                detail=f"not in {folder}",
                fix=f"whisperd models import PATH --name {name}  "
                "(PATH: an openai-whisper .pt or a CTranslate2 folder)",
            )


def _folders(config: Config) -> Iterator[Check]:
    folders = [("state_dir", config.daemon.state_dir), ("models folder", config.models.folder)]
    for inbox in config.inboxes:
        for key in ("path", "output", "cancel", "done", "failed"):
            folders.append((f"inbox {inbox.name} {key}", getattr(inbox, key)))
    for label, folder in folders:
        yield _writable(label, folder)


def _writable(label: str, folder: str) -> Check:
    if not os.path.exists(folder):
        parent = _existing_parent(folder)
        ok = os.access(parent, os.W_OK)
        return Check(
            name=label,
            ok=ok,
            detail=f"{folder} does not exist yet" + (" (created at start)" if ok else ""),
            fix="" if ok else f"create {folder} and give the whisperd user write access",
        )
    if not os.path.isdir(folder):
        return Check(
            name=label, ok=False, detail=f"{folder} is not a folder", fix=f"remove or rename {folder}"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".whisperd-doctor-"):
            pass
    except OSError as exc:
        return Check(
            name=label,
            ok=False,
            detail=f"{folder}: cannot write ({exc.strerror})",
            fix=f"chown/chmod {folder} so the whisperd user can write to it",
        )
    free = shutil.disk_usage(folder).free
    return Check(name=label, ok=True, detail=f"{folder} writable, {free / 2**30:.1f} GiB free")


def _existing_parent(folder: str) -> str:
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder or "/"


def _database(config: Config) -> Check:
    from whisperd.store.job_store import JobStore

    try:
        store = JobStore.open(config.database_url)
    except Exception as exc:  # noqa: BLE001 - any driver error is reported, not raised
        return Check(
            name="database",
            ok=False,
            detail=f"{config.database_url}: {exc}",
            fix="check [daemon] database_url and that the database server is up",
        )
    try:
        counts = store.counts()
    finally:
        store.close()
    total = sum(counts.values())
    return Check(name="database", ok=True, detail=f"{config.database_url}: {total} job(s)")
