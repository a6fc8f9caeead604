"""Writing and checking openai-whisper checkpoints; `whisperd models import`.

Needs torch (to read and write .pt files) but not whisper, and imports it
only inside the functions that read or write a checkpoint: importing this
module (the CLI does, for every command) loads no torch. The daemon's
processes look models up with whisperd.models.locate, which never imports torch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from whisperd.errors import ModelImportError
from whisperd.files.atomic import write_stream_atomic
from whisperd.models.convert import DIM_KEYS, check_whisper_state, parse_ct2_model, standard_model_name
from whisperd.models.locate import (
    CT2_SUFFIX,
    FASTER_WHISPER,
    OPENAI_WHISPER,
    ModelInfo,
    store_ct2_folder,
    validate_model_name,
)

if TYPE_CHECKING:
    import torch

# What torch.load raises on a file that is not a (complete) torch checkpoint,
# or one that holds objects weights_only refuses to unpickle.
_LOAD_ERRORS = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    KeyError,
    AttributeError,
    ImportError,
    zipfile.BadZipFile,
    UnicodeDecodeError,
)


# First bytes of the two torch.save formats: a zip archive, or a pickle (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"

# Permissions of imported checkpoints: the daemon may run as another user, who must read them.
_CHECKPOINT_MODE = 0o644


def save_checkpoint(dims: Mapping[str, int], state: Mapping[str, npt.NDArray[Any]], path: str) -> None:
    """Write an openai-whisper checkpoint, whole or not at all."""
    import torch

    checkpoint = {
        "dims": {key: int(dims[key]) for key in DIM_KEYS},
        "model_state_dict": {key: _tensor(value) for key, value in state.items()},
    }
    write_stream_atomic(path, lambda stream: torch.save(checkpoint, stream), mode=_CHECKPOINT_MODE)


def _tensor(value: npt.NDArray[Any]) -> torch.Tensor:
    import torch

    array = np.ascontiguousarray(value)
    if not array.flags.writeable:
        array = array.copy()  # torch warns about (and must not write through) read-only memory
    tensor = torch.from_numpy(array)
    # torch.save writes a tensor's whole storage: a view into something bigger
    # would drag the rest into the file.
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def read_checkpoint_dims(path: str) -> dict[str, int]:
    """The dims of an openai-whisper checkpoint, after checking that whisper can load it strictly."""
    import torch

    checkpoint = _load(path)
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        raise ModelImportError(path, "not an openai-whisper checkpoint (no 'dims' and 'model_state_dict')")
    dims = _checked_dims(path, checkpoint["dims"])
    state = checkpoint["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelImportError(path, "'model_state_dict' is not a mapping of tensors")
    check_whisper_state(path, dims, {key: tuple(value.shape) for key, value in state.items()})
    return dims


def _load(path: str) -> Any:
    import torch

    _check_magic(path)
    try:
        # mmap: checking a multi-GB checkpoint should not read all of it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        pass  # files in torch's legacy (pre-zip) format cannot be mapped
    except _LOAD_ERRORS as exc:
        raise ModelImportError(path, f"not a torch checkpoint ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        raise ModelImportError(path, f"not a torch checkpoint ({_first_line(exc)})") from exc


def _check_magic(path: str) -> None:
    """torch checkpoints are zip archives (torch >= 1.6) or start with a pickle
    header (older ones); anything else gets a plain reason, not a pickle error."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as exc:
        raise ModelImportError(path, f"cannot read: {exc.strerror or exc}") from exc
    if not head:
        raise ModelImportError(path, "the file is empty")
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_MAGIC):
        raise ModelImportError(path, "not a torch checkpoint (neither a zip archive nor a pickle)")


def _first_line(exc: BaseException) -> str:
    """The gist of a torch error: its first sentence."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].split('. ')[0]}" if lines else type(exc).__name__


def _checked_dims(path: str, dims: Any) -> dict[str, int]:
    if not isinstance(dims, dict):
        raise ModelImportError(path, "'dims' is not a mapping")
    missing = [key for key in DIM_KEYS if key not in dims]
    unexpected = sorted(str(key) for key in dims.keys() - set(DIM_KEYS))
    if missing or unexpected:
        raise ModelImportError(path, f"'dims' lacks {missing} or has unknown keys {unexpected}")
    bad = [key for key in DIM_KEYS if not isinstance(dims[key], int) or dims[key] <= 0]
    if bad:
        raise ModelImportError(path, f"'dims' values {bad} are not positive integers")
    return {key: int(dims[key]) for key in DIM_KEYS}


def import_model(source: str, folder: str, name: str | None, *, replace: bool = False) -> ModelInfo:
    """Store `source` (a whisper .pt file or a CTranslate2 Whisper folder) in `folder` under `name`.

    A .pt file becomes `<name>.pt` (openai-whisper). A CTranslate2 folder is
    converted to `<name>.pt` and, when it holds what faster-whisper needs
    offline (config.json, tokenizer.json), also kept as `<name>.ct2/`, so the
    model serves both engines. Without a name, a .pt file keeps its own name
    and a CTranslate2 folder gets the release name its dimensions identify
    (`tiny.en`). An existing model of that name is only overwritten with `replace`.
    """
    if os.path.isdir(source):
        dims, state = parse_ct2_model(source)
        target = _target(folder, _ct2_default_name(source, dims) if name is None else name, replace)
        stem = os.path.basename(target)[:-3]
        kept = os.path.join(folder, stem + CT2_SUFFIX)
        if os.path.exists(kept) and not replace:
            raise ModelImportError(
                kept, f"a model named {stem!r} already exists; delete it first to replace it"
            )
        with _write_errors(target):
            save_checkpoint(dims, state, target)
        ct2_folder = store_ct2_folder(source, folder, stem, replace=True)
    elif os.path.isfile(source):
        read_checkpoint_dims(source)
        target = _target(folder, _pt_default_name(source) if name is None else name, replace)
        with _write_errors(target):
            write_stream_atomic(target, lambda stream: _copy_into(source, stream), mode=_CHECKPOINT_MODE)
        ct2_folder = None
    else:
        raise ModelImportError(source, "no such file or folder")
    st = os.stat(target)
    return ModelInfo(
        name=os.path.basename(target)[:-3],
        path=target,
        size_bytes=st.st_size,
        mtime=st.st_mtime,
        engines=(OPENAI_WHISPER, FASTER_WHISPER) if ct2_folder else (OPENAI_WHISPER,),
        ct2_folder=ct2_folder,
    )


@contextlib.contextmanager
def _write_errors(target: str) -> Iterator[None]:
    """Disk full, permissions...: name the file being written and the reason."""
    try:
        yield
    except OSError as exc:
        raise ModelImportError(target, f"cannot write the checkpoint: {exc.strerror or exc}") from exc


def _ct2_default_name(source: str, dims: Mapping[str, int]) -> str:
    name = standard_model_name(dims)
    if name is None:
        shape = ", ".join(f"{key}={dims[key]}" for key in DIM_KEYS)
        raise ModelImportError(
            source, f"cannot tell which Whisper model this is ({shape}); give it a name with --name"
        )
    return name


def _pt_default_name(source: str) -> str:
    base = os.path.basename(source)
    return base[:-3] if base.endswith(".pt") else os.path.splitext(base)[0]


def _target(folder: str, name: str, replace: bool) -> str:
    validate_model_name(name)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ModelImportError(folder, f"cannot create the models folder: {exc.strerror or exc}") from exc
    target = os.path.abspath(os.path.join(folder, name + ".pt"))
    if os.path.exists(target) and not replace:
        raise ModelImportError(
            target, f"a model named {name!r} already exists; delete it first to replace it"
        )
    return target


def _copy_into(source: str, stream: IO[bytes]) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, stream, 1 << 20)
