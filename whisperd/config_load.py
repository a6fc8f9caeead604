"""Reading a config file: TOML -> the frozen dataclasses of config.py, validated.

Each value is checked against its field's type and declared checks, then the
cross-field rules: inbox folders that overlap, written folders that are the
root, home, current, config, state or models folder, engine options the
inbox's engine lacks. Errors name the file and the key. Reads the config
file and does no other I/O.

Relative paths in the file are taken relative to the folder of the file, so
a config works the same wherever whisperd is started from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from whisperd.config import SECTIONS, Config, InboxConfig, ModelsConfig, WorkersConfig
from whisperd.errors import ConfigError

T = TypeVar("T")


def load_config(path: str) -> Config:
    """Read, validate and resolve a config file; ConfigError names file and key."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "config file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    return parse_config(raw, source=path)


def parse_config(raw: Mapping[str, Any], *, source: str) -> Config:
    """Validate TOML data; relative paths resolve against the source's folder."""
    base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    unknown = sorted(set(raw) - {*SECTIONS, "inbox"})
    if unknown:
        raise ConfigError(
            source, unknown[0], f"unknown section or key (known: {', '.join([*SECTIONS, 'inbox'])})"
        )
    sections = {
        name: _build(cls, _table(raw.get(name, {}), name, source), name, source, base)
        for name, cls in SECTIONS.items()
    }
    inbox_tables = raw.get("inbox", [])
    if not isinstance(inbox_tables, list):
        raise ConfigError(source, "inbox", "must be an array of tables: write [[inbox]]")
    models: ModelsConfig = sections["models"]
    inboxes = tuple(
        _with_engine(
            _build(InboxConfig, _table(t, f"inbox[{n}]", source), f"inbox[{n}]", source, base), models.engine
        )
        for n, t in enumerate(inbox_tables)
    )
    _check_written_places(inboxes, sections["daemon"].state_dir, models.folder, source)
    _check_inboxes(inboxes, source)
    workers: WorkersConfig = sections["workers"]
    _check_devices(workers.devices, source)
    _check_instance(sections["daemon"].instance, source)
    return Config(source=source, inboxes=inboxes, **sections)


def _with_engine(inbox: InboxConfig, default_engine: str) -> InboxConfig:
    """An inbox that names no engine runs on [models] engine."""
    return inbox if inbox.engine else dataclasses.replace(inbox, engine=default_engine)


def _table(value: Any, where: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(source, where, "must be a table")
    return value


def _build(cls: type[T], table: Mapping[str, Any], where: str, source: str, base: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(source, f"{where}.{key}", f"unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        key = f"{where}.{name}"
        if name not in table:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "is required")
            if fld.metadata.get("path") and isinstance(fld.default, str):
                # A default folder is relative to the config file too, not to
                # wherever whisperd happens to be started from.
                values[name] = _resolve(fld.default, base)
            continue
        value = _coerce(table[name], hints[name], key, source)
        _check(value, fld.metadata, key, source)
        if fld.metadata.get("path"):
            value = _resolve(value, base)
        values[name] = value
    return cls(**values)


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a TOML value against a field's type; ints are accepted as floats."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise ConfigError(source, key, f"has the wrong type ({type(value).__name__}): {value!r}")
    if origin is tuple:
        item_type = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list, not {type(value).__name__}")
        return tuple(_coerce(v, item_type, key, source) for v in value)
    expected: dict[Any, Callable[[Any], bool]] = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if hint in expected and expected[hint](value):
        return float(value) if hint is float else value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(source, key, f"must be {names.get(hint, str(hint))}, not {value!r}")


def _check(value: Any, meta: Mapping[str, Any], key: str, source: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        shown = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(source, key, f"{value!r} is not one of {shown}")
    if "each_in" in meta:
        for item in value:
            if item not in meta["each_in"]:
                raise ConfigError(source, key, f"{item!r} is not one of {', '.join(meta['each_in'])}")
        if not value:
            raise ConfigError(source, key, "must name at least one format")
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(source, key, f"must be at least {meta['minimum']}, not {value!r}")
    if "maximum" in meta and value > meta["maximum"]:
        raise ConfigError(source, key, f"must be at most {meta['maximum']}, not {value!r}")
    if meta.get("path") and not value.strip():
        raise ConfigError(source, key, "must be a folder path, not empty")
    # [] is the default (no hook), as the shipped config shows it; a list whose
    # program is empty would fail at every job's end, so it is refused here.
    if meta.get("command") and value and not value[0].strip():
        raise ConfigError(
            source, key, 'must name a program to run first, such as ["/usr/local/bin/notify"] ([]: none)'
        )


def _check_inboxes(inboxes: tuple[InboxConfig, ...], source: str) -> None:
    names: set[str] = set()
    for n, inbox in enumerate(inboxes):
        where = f"inbox[{n}]"
        if not inbox.name.strip():
            raise ConfigError(source, f"{where}.name", "must not be empty")
        if inbox.name in names:
            raise ConfigError(source, f"{where}.name", f"inbox name {inbox.name!r} is used twice")
        names.add(inbox.name)
        mirrors = {k: getattr(inbox, k) for k in ("output", "cancel", "done", "failed")}
        for key, folder in mirrors.items():
            if _inside(folder, inbox.path):
                raise ConfigError(
                    source,
                    f"{where}.{key}",
                    f"{folder} is inside the inbox {inbox.path}; it would be re-transcribed",
                )
            if _inside(inbox.path, folder):
                raise ConfigError(source, f"{where}.{key}", f"{folder} contains the inbox {inbox.path}")
    roots = [(i.name, i.path) for i in inboxes]
    for a_name, a_path in roots:
        for b_name, b_path in roots:
            if a_name != b_name and _inside(a_path, b_path):
                raise ConfigError(
                    source, "inbox", f"inbox {a_name!r} ({a_path}) lies inside inbox {b_name!r}"
                )
    _check_shared_folders(inboxes, source)
    _check_hallucination_guard(inboxes, source)
    for n, inbox in enumerate(inboxes):
        _check_engine_options(inbox, f"inbox[{n}]", source)
        _check_webhook_url(inbox, f"inbox[{n}]", source)


def _check_webhook_url(inbox: InboxConfig, where: str, source: str) -> None:
    """Only http(s) to a named host: urllib would also open file:// and ftp:// URLs."""
    if not inbox.webhook_url:
        return
    parsed = urllib.parse.urlsplit(inbox.webhook_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            source,
            f"{where}.webhook_url",
            f"inbox {inbox.name!r}: {inbox.webhook_url!r} is not an http:// or https:// URL with a host",
        )


def _check_engine_options(inbox: InboxConfig, where: str, source: str) -> None:
    """Refuse an option the inbox's engine does not have, rather than ignore it."""
    if inbox.engine == "openai-whisper":
        unsupported = {
            "compute_type": (
                inbox.compute_type != "auto",
                "openai-whisper has no compute types (float32 on CPU, float16 on CUDA)",
            ),
            "batch_size": (inbox.batch_size > 1, "openai-whisper has no batched pipeline"),
            "hotwords": (bool(inbox.hotwords), "openai-whisper has no hotwords"),
        }
        for key, (refused, reason) in unsupported.items():
            if refused:
                raise ConfigError(
                    source, f"{where}.{key}", f'{reason}; set engine = "faster-whisper" or remove {key}'
                )
    if inbox.engine == "faster-whisper" and inbox.batch_size > 1:
        _check_batched(inbox, where, source)


def _check_batched(inbox: InboxConfig, where: str, source: str) -> None:
    """faster-whisper's batched pipeline decodes VAD speech chunks one by one,
    independently: it needs VAD (it cannot cut longer audio without it) and
    has no conditioning on earlier text, no temperature fallback and no
    hallucination skipping. Options asking for those are refused."""
    needs = {
        "vad": (not inbox.vad, "must be true (the pipeline cuts the audio at VAD speech regions)"),
        "condition_on_previous_text": (
            inbox.condition_on_previous_text,
            "must be false (each chunk is decoded without the text before it)",
        ),
        "temperature": (len(inbox.temperature) > 1, "must be one value, e.g. [0.0] (no fallback)"),
        "hallucination_silence_threshold": (
            inbox.hallucination_silence_threshold > 0,
            "must be 0 (the batched pipeline has no hallucination skipping)",
        ),
    }
    for key, (refused, reason) in needs.items():
        if refused:
            raise ConfigError(source, f"{where}.{key}", f"with batch_size = {inbox.batch_size}, {reason}")


def _check_hallucination_guard(inboxes: tuple[InboxConfig, ...], source: str) -> None:
    """hallucination_silence_threshold works on word timings: without
    word_timestamps the engines would silently ignore it."""
    for n, inbox in enumerate(inboxes):
        if inbox.hallucination_silence_threshold and not inbox.word_timestamps:
            raise ConfigError(
                source,
                f"inbox[{n}].hallucination_silence_threshold",
                "needs word_timestamps = true (it judges suspect text by its word timings)",
            )


# The folders whisperd writes into for an inbox; two inboxes must never share one.
_WRITTEN_FOLDERS = ("output", "cancel", "done", "failed")


def _check_shared_folders(inboxes: tuple[InboxConfig, ...], source: str) -> None:
    """Refuse an output/cancel/done/failed folder that is, contains or lies
    inside a folder of another inbox (or that inbox itself): each inbox owns
    its names, so two inboxes would overwrite each other's files."""
    for n, inbox in enumerate(inboxes):
        # The later inbox of a clashing pair is named: the one that was added.
        earlier = inboxes[:n]
        others = [(o, f"{k} folder", str(getattr(o, k))) for o in earlier for k in _WRITTEN_FOLDERS]
        others += [(o, "inbox folder", o.path) for o in earlier]
        for key in ("path", *_WRITTEN_FOLDERS):
            folder = str(getattr(inbox, key))
            for other, what, theirs in others:
                if key == "path" and what == "inbox folder":
                    continue  # inboxes inside inboxes: checked above
                if _inside(folder, theirs) or _inside(theirs, folder):
                    raise ConfigError(
                        source,
                        f"inbox[{n}].{key}",
                        f"{folder} overlaps the {what} {theirs} of inbox {other.name!r}; two inboxes "
                        "would overwrite each other's files (give each inbox its own folders)",
                    )


def _check_written_places(
    inboxes: tuple[InboxConfig, ...], state_dir: str, models_dir: str, source: str
) -> None:
    """Refuse an output/cancel/done/failed folder that resolves to a place
    whisperd must never fill with transcripts, error notes or moved sources:
    the file system root, the home folder, the current folder, the config
    file's own folder (where "." resolves) or a folder above it, and the
    state and models folders."""
    config_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    forbidden = {
        os.path.abspath(os.sep): "the file system root",
        os.path.expanduser("~"): "the home folder",
        os.getcwd(): "the current folder",
    }
    for n, inbox in enumerate(inboxes):
        for key in _WRITTEN_FOLDERS:
            folder = os.path.normpath(str(getattr(inbox, key)))
            why = forbidden.get(folder)
            if why is None and _inside(config_dir, folder):
                why = f"the folder of the config file ({config_dir}) or one above it"
            for name, place in (("state folder", state_dir), ("models folder", models_dir)):
                if why is None and (_inside(folder, place) or _inside(place, folder)):
                    why = f"the {name} {place} or overlaps it"
            if why is not None:
                raise ConfigError(
                    source,
                    f"inbox[{n}].{key}",
                    f"{folder} (inbox {inbox.name!r}) is {why}; give the inbox a folder of its own",
                )


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# An instance name is the first part of every worker id ("NAME/cpu-0").
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_instance(name: str, source: str) -> None:
    if name and not _INSTANCE_NAME.fullmatch(name):
        raise ConfigError(
            source,
            "daemon.instance",
            f"{name!r} is not a valid instance name (letters, digits, '.', '_', '-'; at most 64; "
            "starting with a letter or digit)",
        )


def _check_devices(devices: str | tuple[int, ...], source: str) -> None:
    if isinstance(devices, str):
        if devices not in ("auto", "cpu"):
            raise ConfigError(
                source, "workers.devices", f'{devices!r} is not "auto", "cpu" or a list of GPU indexes'
            )
        return
    if not devices:
        raise ConfigError(source, "workers.devices", "the list of GPU indexes is empty")
    if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise ConfigError(
            source, "workers.devices", f"GPU indexes must be distinct and >= 0: {list(devices)}"
        )
