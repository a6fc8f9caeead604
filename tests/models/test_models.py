"""Model import and the models folder, on the real bundled tiny.en model."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SENTENCES, SpeechFactory, require_tiny_en_folder, wer
from whisperd.errors import ModelImportError
from whisperd.models import convert as model_convert
from whisperd.models import locate as models
from whisperd.models.checkpoints import import_model, read_checkpoint_dims, save_checkpoint

TINY_EN_DIMS = {
    "n_mels": 80,
    "n_vocab": 51864,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}

# CTranslate2 dtype ids by numpy dtype (the writer below is the reader's mirror image).
_CT2_DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


@pytest.fixture(scope="session")
def bundled() -> str:
    return require_tiny_en_folder()


def _ct2_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2_folder(folder: Path, variables: Mapping[str, np.ndarray], aliases: Mapping[str, str]) -> Path:
    """Write a CTranslate2 (binary version 6) Whisper folder, as ctranslate2's converter would."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.bin", "wb") as out:
        out.write(struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<II", 3, len(variables)))
        for name, value in variables.items():
            out.write(_ct2_string(name) + struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape))
            data = np.ascontiguousarray(value).tobytes()
            out.write(struct.pack("<BI", _CT2_DTYPE_IDS[value.dtype.name], len(data)) + data)
        out.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            out.write(_ct2_string(alias) + _ct2_string(target))
    return folder


def _int8_quantized(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `ct2-transformers-converter --quantization int8_float16` stores: every
    matrix as int8 rows with a float32 scale per row, q = round(w * 127 / max|row|)."""
    result: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("/weight") and value.ndim == 2:
            weights = value.astype(np.float32)
            amax = np.abs(weights).max(axis=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).astype(np.float32)
            result[name] = np.rint(weights * scale[:, None]).astype(np.int8)
            result[name + "_scale"] = scale
        else:
            result[name] = value
    return result


def _patched_model_bin(bundled: str, tmp_path: Path, old: bytes, new: bytes) -> Path:
    folder = tmp_path / "patched"
    folder.mkdir()
    data = (Path(bundled) / "model.bin").read_bytes()
    assert data.count(old) >= 1
    (folder / "model.bin").write_bytes(data.replace(old, new, 1))
    return folder


def _transcribe(checkpoint: str, audio: Path) -> str:
    import whisper

    # load_model loads the state_dict strictly: a missing or stray tensor fails here.
    model = whisper.load_model(checkpoint, device="cpu")
    return str(model.transcribe(str(audio), fp16=False, language="en")["text"])


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_bundled_tiny_en_imports_and_transcribes_speech(
    bundled: str, tmp_path: Path, speech: SpeechFactory
) -> None:
    folder = tmp_path / "models"

    info = import_model(bundled, str(folder), None)

    assert info.name == "tiny.en"
    assert info.path == str(folder / "tiny.en.pt")
    assert read_checkpoint_dims(info.path) == TINY_EN_DIMS
    text = _transcribe(info.path, speech(SENTENCES[0], "weather"))
    assert wer(SENTENCES[0], text) < 0.5, text


@pytest.mark.slow
def test_int8_quantized_folder_imports_and_transcribes(
    bundled: str, tmp_path: Path, speech: SpeechFactory
) -> None:
    raw = model_convert.read_ct2_file(os.path.join(bundled, "model.bin"))
    quantized = write_ct2_folder(tmp_path / "int8", _int8_quantized(raw.variables), raw.aliases)
    _, reference = model_convert.parse_ct2_model(bundled)

    dims, state = model_convert.parse_ct2_model(str(quantized))

    assert dims == TINY_EN_DIMS
    query = "decoder.blocks.1.attn.query.weight"
    row_step = np.abs(reference[query].astype(np.float32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(state[query] - reference[query].astype(np.float32)) <= row_step)
    checkpoint = str(tmp_path / "int8.pt")
    save_checkpoint(dims, state, checkpoint)
    text = _transcribe(checkpoint, speech(SENTENCES[1], "plants"))
    assert wer(SENTENCES[1], text) < 0.5, text


def test_conversion_splits_fused_attention_and_keeps_the_tied_embedding(bundled: str) -> None:
    raw = model_convert.read_ct2_file(os.path.join(bundled, "model.bin"))

    _, state = model_convert.parse_ct2_model(bundled)

    fused = raw.variables["encoder/layer_2/self_attention/linear_0/weight"]
    width = fused.shape[1]
    assert np.array_equal(state["encoder.blocks.2.attn.query.weight"], fused[:width])
    assert np.array_equal(state["encoder.blocks.2.attn.key.weight"], fused[width : 2 * width])
    assert np.array_equal(state["encoder.blocks.2.attn.value.weight"], fused[2 * width :])
    cross = raw.variables["decoder/layer_0/attention/linear_1/bias"]
    assert np.array_equal(state["decoder.blocks.0.cross_attn.value.bias"], cross[width:])
    assert "decoder.blocks.0.cross_attn.key.bias" not in state
    assert raw.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert state["decoder.token_embedding.weight"].shape == (51864, 384)


def test_models_dir_fixture_holds_a_loadable_tiny_en(models_dir: Path) -> None:
    assert [info.name for info in models.list_models(str(models_dir))] == ["tiny.en"]
    assert read_checkpoint_dims(str(models_dir / "tiny.en.pt")) == TINY_EN_DIMS


def test_unknown_dimensions_need_a_name(bundled: str, tmp_path: Path) -> None:
    raw = model_convert.read_ct2_file(os.path.join(bundled, "model.bin"))
    three_layers = {name: value for name, value in raw.variables.items() if "/layer_3/" not in name}
    source = write_ct2_folder(tmp_path / "custom", three_layers, raw.aliases)

    with pytest.raises(ModelImportError, match="--name") as error:
        import_model(str(source), str(tmp_path / "models"), None)
    assert error.value.path == str(source)

    info = import_model(str(source), str(tmp_path / "models"), "tiny-3")
    assert read_checkpoint_dims(info.path) == {**TINY_EN_DIMS, "n_audio_layer": 3, "n_text_layer": 3}


# --------------------------------------------------------------------------- .pt files and the folder


def test_pt_import_round_trip(models_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "my-model.pt"
    shutil.copyfile(models_dir / "tiny.en.pt", source)
    folder = tmp_path / "models"

    info = import_model(str(source), str(folder), None)

    assert info.name == "my-model"
    assert Path(info.path).read_bytes() == source.read_bytes()
    assert info.size_bytes == source.stat().st_size
    assert models.list_models(str(folder)) == [info]
    assert models.model_location(str(folder), "my-model", models.OPENAI_WHISPER) == info.path
    assert models.model_location(str(folder), "absent", models.OPENAI_WHISPER) is None
    assert [name for name in os.listdir(folder)] == ["my-model.pt"]  # no temp file left behind


def test_an_imported_checkpoint_is_readable_by_the_daemons_user_whatever_the_umask(
    models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    old = os.umask(0o077)  # an operator's private umask must not hide the model from the daemon
    try:
        info = import_model(str(models_dir / "tiny.en.pt"), str(folder), "private")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o644
    assert os.listdir(folder) == ["private.pt"]


def test_import_refuses_to_overwrite_unless_asked(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    first = import_model(str(models_dir / "tiny.en.pt"), str(folder), None)
    with pytest.raises(ModelImportError, match="already exists") as error:
        import_model(str(models_dir / "tiny.en.pt"), str(folder), None)
    assert error.value.path == first.path

    again = import_model(str(models_dir / "tiny.en.pt"), str(folder), None, replace=True)
    other = import_model(str(models_dir / "tiny.en.pt"), str(folder), "base-copy")

    assert [info.name for info in models.list_models(str(folder))] == ["base-copy", "tiny.en"]
    assert again.path == first.path
    assert other.path == str(folder / "base-copy.pt")


def test_list_models_skips_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "b.pt").write_bytes(b"b" * 10)
    (tmp_path / "a.pt").write_bytes(b"a" * 20)
    (tmp_path / ".tiny.en.pt.123.tmp").write_bytes(b"half")
    (tmp_path / ".hidden.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.pt").mkdir()

    found = models.list_models(str(tmp_path))

    assert [(info.name, info.size_bytes) for info in found] == [("a", 20), ("b", 10)]
    assert found[0].path == str(tmp_path / "a.pt")
    assert found[0].mtime == pytest.approx((tmp_path / "a.pt").stat().st_mtime)
    assert models.list_models(str(tmp_path / "not-yet")) == []
    with pytest.raises(ModelImportError, match="is a file"):
        models.list_models(str(tmp_path / "notes.txt"))


def test_whisper_cache_path_matches_whispers_own_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import whisper

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in whisper.available_models():
        expected = tmp_path / "whisper" / os.path.basename(whisper._MODELS[name])
        assert models.whisper_cache_path(name) == str(expected)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.whisper_cache_path("tiny.en") == os.path.expanduser("~/.cache/whisper/tiny.en.pt")


# --------------------------------------------------------------------------- bad input


def test_folder_without_model_bin(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelImportError, match=r"no model\.bin") as error:
        import_model(str(tmp_path), str(tmp_path / "models"), None)
    assert error.value.path == str(tmp_path)
    assert not (tmp_path / "models").exists() or not os.listdir(tmp_path / "models")


@pytest.mark.parametrize("keep", [6, 1_000_000])
def test_truncated_model_bin(bundled: str, tmp_path: Path, keep: int) -> None:
    with open(os.path.join(bundled, "model.bin"), "rb") as source:
        (tmp_path / "model.bin").write_bytes(source.read(keep))

    with pytest.raises(ModelImportError, match="truncated") as error:
        model_convert.parse_ct2_model(str(tmp_path))
    assert error.value.path == str(tmp_path / "model.bin")
    assert f"file ends at {keep} bytes" in error.value.reason


def test_unsupported_binary_version(bundled: str, tmp_path: Path) -> None:
    folder = _patched_model_bin(bundled, tmp_path, struct.pack("<I", 6), struct.pack("<I", 5))
    with pytest.raises(ModelImportError, match="binary version 5 is not supported"):
        model_convert.parse_ct2_model(str(folder))


def test_model_that_is_not_whisper(bundled: str, tmp_path: Path) -> None:
    folder = _patched_model_bin(bundled, tmp_path, _ct2_string("WhisperSpec"), _ct2_string("TransformerSpec"))
    with pytest.raises(ModelImportError, match="'TransformerSpec', not 'WhisperSpec'"):
        model_convert.parse_ct2_model(str(folder))


def test_integer_weights_without_scale(bundled: str, tmp_path: Path) -> None:
    raw = model_convert.read_ct2_file(os.path.join(bundled, "model.bin"))
    broken = _int8_quantized(raw.variables)
    del broken["encoder/layer_0/ffn/linear_0/weight_scale"]
    folder = write_ct2_folder(tmp_path / "broken", broken, raw.aliases)
    with pytest.raises(
        ModelImportError, match="encoder/layer_0/ffn/linear_0/weight holds int8 values with no scale"
    ):
        model_convert.parse_ct2_model(str(folder))


def test_text_file_named_pt(tmp_path: Path) -> None:
    fake = tmp_path / "x.pt"
    fake.write_text("this is not a model\n")
    with pytest.raises(ModelImportError, match="not a torch checkpoint") as error:
        import_model(str(fake), str(tmp_path / "models"), None)
    assert error.value.path == str(fake)
    assert models.list_models(str(tmp_path / "models")) == []


def test_torch_file_that_is_not_whisper(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ModelImportError, match="not an openai-whisper checkpoint"):
        read_checkpoint_dims(str(other))


def test_whisper_checkpoint_with_a_missing_tensor(models_dir: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(models_dir / "tiny.en.pt", weights_only=True)
    del checkpoint["model_state_dict"]["decoder.ln.bias"]
    damaged = tmp_path / "damaged.pt"
    torch.save(checkpoint, damaged)
    with pytest.raises(ModelImportError, match=r"missing 1 tensor\(s\), e.g. decoder.ln.bias"):
        import_model(str(damaged), str(tmp_path / "models"), None)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="no such file or folder"):
        import_model(str(tmp_path / "nowhere"), str(tmp_path / "models"), None)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("../evil", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".hidden", "starts with a dot"),
        ("tiny.en.pt", "leave out the .pt suffix"),
        ("bad\nname", "control characters"),
    ],
)
def test_bad_model_names(models_dir: Path, tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(ModelImportError, match=reason):
        models.validate_model_name(name)
    with pytest.raises(ModelImportError, match=reason):
        models.model_location(str(models_dir), name, models.OPENAI_WHISPER)
    with pytest.raises(ModelImportError, match=reason):
        import_model(str(models_dir / "tiny.en.pt"), str(tmp_path / "models"), name)
    assert not (tmp_path / "evil.pt").exists()


# --------------------------------------------------------------------------- one rule for where a model lives


def _agreement_config(tmp_path: Path, folder: Path) -> Path:
    """A config whose inboxes ask for every model form, each on its engine."""
    lines = [f'[models]\nfolder = "{folder}"\ndefault = "pt-only"\n']
    wanted = [
        ("pt-only", "openai-whisper"),
        ("cached", "openai-whisper"),
        ("fw", "faster-whisper"),
        ("tiny.en", "faster-whisper"),
    ]
    for n, (model, engine) in enumerate(wanted):
        folders = "".join(
            f'{key} = "{tmp_path / f"{key}{n}"}"\n' for key in ("output", "cancel", "done", "failed")
        )
        lines.append(
            f'[[inbox]]\nname = "i{n}"\npath = "{tmp_path / f"in{n}"}"\n{folders}'
            f'model = "{model}"\nengine = "{engine}"\n'
        )
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines))
    return config


def test_workers_doctor_and_models_list_find_each_model_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from whisperd.cli import commands as cli
    from whisperd.cli import doctor
    from whisperd.config_load import load_config
    from whisperd.engines import openai as transcriber

    bundled = require_tiny_en_folder()
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "pt-only.pt").write_bytes(b"weights")
    (folder / "fw.ct2").mkdir()
    for item in models.CT2_REQUIRED:
        os.link(Path(bundled) / item, folder / "fw.ct2" / item)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "whisper").mkdir(parents=True)
    (tmp_path / "cache" / "whisper" / "cached.pt").write_bytes(b"downloaded")
    config_path = _agreement_config(tmp_path, folder)
    config = load_config(str(config_path))

    expected = {
        ("pt-only", "openai-whisper"): str(folder / "pt-only.pt"),
        ("cached", "openai-whisper"): str(tmp_path / "cache" / "whisper" / "cached.pt"),
        ("fw", "faster-whisper"): str(folder / "fw.ct2"),
        ("tiny.en", "faster-whisper"): bundled,
    }
    # The workers' engines: openai-whisper resolves a file, faster-whisper a folder.
    for (name, engine), where in expected.items():
        if engine == "openai-whisper":
            assert transcriber.resolve_model_file(name, str(folder), allow_download=False) == where
        else:
            assert models.ct2_model_folder(str(folder), name) == where
    # doctor points at the same places.
    checks = {check.name: check for check in doctor.run_checks(config)}
    for (name, engine), where in expected.items():
        label = f"model {name}" if engine == "openai-whisper" else f"model {name} ({engine})"
        assert checks[label].ok and checks[label].detail == f"available ({where})"
    # models list shows what is in the folder and the bundled tiny.en, at those paths.
    assert cli.main(["models", "list", "--config", str(config_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert expected[("pt-only", "openai-whisper")] in rows["pt-only"].split()
    assert expected[("fw", "faster-whisper")] in rows["fw"].split()
    assert bundled in rows["tiny.en"] and "bundled" in rows["tiny.en"]
    # A model none of them can find is missing for all of them.
    assert models.model_location(str(folder), "absent", models.OPENAI_WHISPER) is None
    assert models.ct2_model_folder(str(folder), "pt-only") is None


def test_model_commands_do_not_load_torch() -> None:
    """`models list`, `doctor` and the CLI start without torch: only the worker's
    engine modules (and reading or writing a checkpoint) import it."""
    probe = (
        "import sys, whisperd.cli.commands, whisperd.models.locate, whisperd.models.checkpoints,"
        " whisperd.cli.doctor;"
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
