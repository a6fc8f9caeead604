"""An inbox's output, cancel, done and failed folders must be folders of
its own: a config whose folder is empty, or resolves to the current folder,
the config's folder (or above), the root or the state folder, is refused by
the real `whisperd run` at load, naming the key and the inbox, before
anything is written anywhere (error notes in the daemon's cwd, issue 11).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.daemon_harness import WHISPERD

KEYS = ("output", "cancel", "done", "failed")

# Bad values for a folder, and words the refusal must contain.
BAD_VALUES = {
    "empty": ("", "must be a folder path, not empty"),
    "blank": ("  ", "must be a folder path, not empty"),
    "config folder": (".", "the folder of the config file"),
    "above the config": ("..", "the folder of the config file"),
    "root": ("/", "the file system root"),
    "state folder": ("state/sub", "the state folder"),
}


def _config_text(key: str, value: str) -> str:
    folders = {k: k for k in KEYS}
    folders[key] = value
    lines = ["[daemon]", 'state_dir = "state"', "[[inbox]]", 'name = "talks"', 'path = "in"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in folders.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_run_refuses_a_folder_that_is_not_the_inboxes_own(
    tmp_path: Path, key: str, bad: tuple[str, str]
) -> None:
    value, reason = bad
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    config = conf_dir / "whisperd.toml"
    config.write_text(_config_text(key, value), encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    done = subprocess.run(
        [*WHISPERD, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )

    assert done.returncode != 0
    assert f"{config}: inbox[0].{key}" in done.stderr, done.stderr
    assert reason in done.stderr, done.stderr
    if value.strip():
        assert "inbox 'talks'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(cwd.iterdir()) == [], "nothing is written into the daemon's current folder"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["whisperd.toml"], "no folder is created"


def test_a_folder_next_to_the_config_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "whisperd.toml"
    config.write_text(_config_text("failed", "failed"), encoding="utf-8")
    done = subprocess.run(
        [*WHISPERD, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
