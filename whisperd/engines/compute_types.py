"""Which CTranslate2 compute types each device can run.

An inbox's `compute_type` that a device of the pool cannot run is refused at
start, naming the key. Asking CTranslate2 means loading it, and on a GPU
initialising CUDA: that happens in a short child process, so the daemon
itself never holds either (`python -m whisperd.engines.compute_types DEVICE...`
prints one JSON object: device -> sorted types, or an error string).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from whisperd.config import Config
from whisperd.errors import ConfigError

# The child imports ctranslate2 only; a GPU's first CUDA call can take seconds.
_PROBE_TIMEOUT_SECONDS = 120.0


def supported_types(devices: Sequence[str]) -> dict[str, list[str] | str]:
    """device ("cpu", "cuda:0") -> the compute types it supports, or why that is unknown."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "whisperd.engines.compute_types", *devices],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return dict.fromkeys(devices, f"cannot ask CTranslate2: {exc}")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict.fromkeys(devices, f"cannot ask CTranslate2: {reason}")
    answer: dict[str, list[str] | str] = json.loads(done.stdout)
    return answer


def check_compute_types(config: Config, devices: Sequence[str]) -> None:
    """Raise ConfigError naming the first faster-whisper inbox whose
    compute_type some device of the pool cannot run ("auto" always runs)."""
    wanted = [
        (n, inbox.compute_type)
        for n, inbox in enumerate(config.inboxes)
        if inbox.engine == "faster-whisper" and inbox.compute_type != "auto"
    ]
    if not wanted:
        return
    kinds = sorted(set(devices))
    supported = supported_types(kinds)
    for n, compute_type in wanted:
        for device in kinds:
            types = supported.get(device, "not probed")
            if isinstance(types, str):
                raise ConfigError(
                    config.source, f"inbox[{n}].compute_type", f"cannot check {compute_type!r}: {types}"
                )
            if compute_type not in types:
                raise ConfigError(
                    config.source,
                    f"inbox[{n}].compute_type",
                    f"{device} cannot run {compute_type!r} (it supports: {', '.join(types)}); "
                    'choose one of those or "auto"',
                )


def _probe(devices: Sequence[str]) -> dict[str, list[str] | str]:
    import ctranslate2

    answer: dict[str, list[str] | str] = {}
    for device in devices:
        kind, _, index = device.partition(":")
        try:
            answer[device] = sorted(ctranslate2.get_supported_compute_types(kind, int(index or 0)))
        except (RuntimeError, ValueError) as exc:
            answer[device] = str(exc)
    return answer


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_probe(sys.argv[1:])) + "\n")
