"""CTranslate2 Whisper folders read as openai-whisper weights.

`parse_ct2_model` reads a CTranslate2 model.bin (the format faster-whisper
loads) into openai-whisper's `dims` and state_dict as plain numpy arrays, named
the way openai-whisper names them; `check_whisper_state` checks any state's
shapes against what openai-whisper expects. Writing the .pt file needs torch
and lives in models/checkpoints.py; finding models on disk is models/locate.py's.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
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


# --------------------------------------------------------------------------- openai-whisper shapes


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
