"""The config file: every mistake named with its file and key, the effective
config printed by `whisperd check-config`, and the shipped config.toml.

Errors are checked twice, where code meets them (`load_config`) and where a
person does (the real CLI in a subprocess: message on stderr, exit code).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import WHISPERD
from whisperd.config import SECTIONS, InboxConfig
from whisperd.config_load import load_config
from whisperd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def describe_keys() -> dict[str, dict[str, str]]:
    """Every key config.py defines with its documentation, per section."""
    sections: list[tuple[str, type[Any]]] = [*SECTIONS.items(), ("inbox", InboxConfig)]
    return {
        section: {f.name: str(f.metadata.get("doc", "")) for f in dataclasses.fields(cls)}
        for section, cls in sections
    }


SHIPPED_CONFIG = REPO / "config.toml"

# A valid inbox; the cases below change one thing about it or around it.
INBOX = """
[[inbox]]
name = "talks"
path = "in"
output = "out"
cancel = "cancel"
done = "done"
failed = "failed"
"""

# A second inbox with folders of its own.
SECOND_INBOX = """
[[inbox]]
name = "calls"
path = "in2"
output = "out2"
cancel = "cancel2"
done = "done2"
failed = "failed2"
"""


@dataclass(frozen=True)
class BadConfig:
    """A config file with one mistake, and what the error must say."""

    text: str
    # The key the error names ("" when the whole file is at fault).
    key: str
    # Words the reason must contain.
    reason: str


BAD_CONFIGS = {
    "unknown key": BadConfig("[daemon]\nsettle_secs = 1\n" + INBOX, "daemon.settle_secs", "unknown key"),
    "unknown section": BadConfig("[deamon]\nlog_level = 'info'\n" + INBOX, "deamon", "unknown section"),
    "wrong type": BadConfig("[workers]\nmax_attempts = 'three'\n" + INBOX, "workers.max_attempts", "integer"),
    "wrong type in inbox": BadConfig(INBOX + "beam_size = true\n", "inbox[0].beam_size", "integer"),
    "not a list": BadConfig(INBOX + "formats = 'txt'\n", "inbox[0].formats", "must be a list"),
    "bad choice": BadConfig(
        "[daemon]\nlog_level = 'loud'\n" + INBOX, "daemon.log_level", "'loud' is not one of"
    ),
    "bad OpenCC config": BadConfig(INBOX + "chinese = 'zh'\n", "inbox[0].chinese", "'zh' is not one of"),
    "bad format": BadConfig(
        INBOX + "formats = ['txt', 'docx']\n", "inbox[0].formats", "'docx' is not one of"
    ),
    "hallucination guard without word timings": BadConfig(
        INBOX + "hallucination_silence_threshold = 2.0\n",
        "inbox[0].hallucination_silence_threshold",
        "needs word_timestamps = true",
    ),
    "below minimum": BadConfig(
        "[daemon]\nsettle_seconds = -1\n" + INBOX, "daemon.settle_seconds", "at least"
    ),
    "bad devices": BadConfig("[workers]\ndevices = 'gpu'\n" + INBOX, "workers.devices", "'gpu'"),
    "missing inbox key": BadConfig(
        INBOX.replace('failed = "failed"\n', ""), "inbox[0].failed", "is required"
    ),
    "output inside inbox": BadConfig(
        INBOX.replace('output = "out"', 'output = "in/out"'), "inbox[0].output", "inside the inbox"
    ),
    "duplicate inbox names": BadConfig(
        INBOX + INBOX.replace('"in"', '"in2"').replace('"out"', '"out2"'), "inbox[1].name", "used twice"
    ),
    "inbox not an array": BadConfig(INBOX.replace("[[inbox]]", "[inbox]"), "inbox", "[[inbox]]"),
    "output shared by two inboxes": BadConfig(
        INBOX + SECOND_INBOX.replace('"out2"', '"out"'), "inbox[1].output", "overlaps the output folder"
    ),
    "done nested in another inbox's done": BadConfig(
        INBOX + SECOND_INBOX.replace('"done2"', '"done/second"'), "inbox[1].done", "overlaps the done folder"
    ),
    "failed holding another inbox's output": BadConfig(
        INBOX.replace('"out"', '"shared/out"') + SECOND_INBOX.replace('"failed2"', '"shared"'),
        "inbox[1].failed",
        "overlaps the output folder",
    ),
    "bad TOML": BadConfig("[daemon\nlog_level = 'info'\n", "", "not valid TOML"),
}


def write_config(folder: Path, text: str, name: str = "whisperd.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def whisperd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WHISPERD, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def where(path: Path, key: str) -> str:
    """How an error message locates a mistake: the file, then the key."""
    return f"{path}: {key}" if key else str(path)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_load_config_names_file_key_and_reason(case: BadConfig, tmp_path: Path) -> None:
    path = write_config(tmp_path, case.text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    error = raised.value
    assert (error.file, error.key) == (str(path), case.key)
    assert case.reason in error.reason
    assert str(error).startswith(where(path, case.key) + ": ")


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_check_config_exits_2_with_the_mistake_on_stderr(case: BadConfig, tmp_path: Path) -> None:
    path = write_config(tmp_path, case.text)
    done = whisperd("check-config", "--config", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert where(path, case.key) in done.stderr and case.reason in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "whisperd.toml"
    with pytest.raises(ConfigError, match="config file not found") as raised:
        load_config(str(path))
    assert raised.value.file == str(path)
    done = whisperd("check-config", "--config", str(path))
    assert done.returncode == 2
    assert f"{path}: config file not found" in done.stderr


def test_relative_config_path_is_reported_absolute(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD_CONFIGS["unknown key"].text)
    done = whisperd("check-config", "--config", path.name, cwd=tmp_path)
    assert done.returncode == 2
    assert f"{path}: daemon.settle_secs" in done.stderr


@pytest.mark.parametrize("name", ["unknown key", "output inside inbox", "bad TOML"])
def test_run_refuses_to_start_on_a_bad_config(name: str, tmp_path: Path) -> None:
    case = BAD_CONFIGS[name]
    path = write_config(tmp_path, case.text)
    done = whisperd("run", "--config", str(path))
    assert done.returncode != 0
    assert where(path, case.key) in done.stderr and case.reason in done.stderr
    assert not (tmp_path / "in").exists(), "a refused config must not create its folders"


# --------------------------------------------------------------------------- effective config


def test_check_config_prints_the_effective_config_resolved_against_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    text = '[daemon]\nstate_dir = "state"\n[workers]\nmax_attempts = 5\n' + INBOX + 'language = "en"\n'
    path = write_config(conf, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    done = whisperd("check-config", "--config", "etc/whisperd.toml", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# effective config of {path}: OK\n")
    effective = tomllib.loads(done.stdout)
    assert effective["daemon"]["state_dir"] == str(conf / "state")
    assert effective["daemon"]["database_url"] == f"sqlite:///{conf / 'state' / 'jobs.db'}"
    inbox = effective["inbox"][0]
    for key, folder in {"path": "in", "output": "out", "cancel": "cancel", "done": "done"}.items():
        assert inbox[key] == str(conf / folder)
    assert effective["models"]["folder"] == str(conf / "var" / "models")
    # What was set, and the defaults of what was not.
    assert effective["workers"]["max_attempts"] == 5
    assert inbox["language"] == "en"
    assert inbox["formats"] == ["txt", "srt", "vtt", "json", "tsv"]  # the documented default
    assert effective["daemon"]["settle_seconds"] == 2.0
    # Every key is shown, so the output documents the whole effective config.
    keys = describe_keys()
    for section in ("daemon", "models", "workers", "metrics"):
        assert set(effective[section]) == set(keys[section])
    assert set(inbox) == set(keys["inbox"])
    # And it is itself a valid config meaning the same thing.
    again = write_config(elsewhere, done.stdout, "effective.toml")
    assert load_config(str(again)).to_dict() == load_config(str(path)).to_dict()


def test_database_url_given_is_kept(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    path = write_config(tmp_path, f'[daemon]\ndatabase_url = "{url}"\n' + INBOX)
    assert load_config(str(path)).database_url == url


# --------------------------------------------------------------------------- the shipped config


def test_the_shipped_config_is_valid() -> None:
    config = load_config(str(SHIPPED_CONFIG))
    assert [inbox.path for inbox in config.inboxes] == [str(REPO / "var" / "inbox")]
    assert config.database_url == f"sqlite:///{REPO / 'var' / 'state' / 'jobs.db'}"
    done = whisperd("check-config", "--config", str(SHIPPED_CONFIG))
    assert done.returncode == 0, done.stderr


_SECTION = re.compile(r"^\[\[?(\w+)\]\]?\s*$")
_KEY = re.compile(r"^(\w+)\s*=")


def _documented_keys(text: str) -> dict[str, dict[str, bool]]:
    """Per section, each key set in the file and whether the line right
    above it is a comment (every key documents itself)."""
    found: dict[str, dict[str, bool]] = {}
    section = ""
    previous = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if match := _SECTION.match(line):
            section = match.group(1)
        elif match := _KEY.match(line):
            found.setdefault(section, {})[match.group(1)] = previous.startswith("#")
        previous = line
    return found


def test_the_shipped_config_documents_every_key() -> None:
    in_file = _documented_keys(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    for section, keys in describe_keys().items():
        for key in keys:
            assert key in in_file.get(section, {}), f"[{section}] {key} is missing from {SHIPPED_CONFIG}"
            assert in_file[section][key], f"[{section}] {key} has no comment above it in {SHIPPED_CONFIG}"
