"""The pool's slots and health policy: which worker slots the
configured devices get, how many CPU threads each may use, and when the pool
calls a device or a worker sick.

The daemon plans with these and hands them to workers.pool.WorkerPool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from whisperd.config import WorkersConfig
from whisperd.errors import WhisperdError


@dataclass(frozen=True, kw_only=True)
class Slot:
    # Slot name, unique on this host: "cpu-0", "gpu0-0", "gpu1-0"...
    name: str
    # torch device of the slot.
    device: str
    # NVML index of the slot's GPU, whose health decides whether it may
    # claim; None for CPU slots.
    gpu_index: int | None = None


def plan_slots(workers: WorkersConfig, gpu_indexes: Sequence[int]) -> list[Slot]:
    """Slots for the configured devices: every GPU ("auto") or the listed
    ones, `jobs_per_device` each; the CPU where there is no GPU. A listed GPU
    that is not there is an error (its worker could never run a job)."""
    if workers.devices == "cpu" or (workers.devices == "auto" and not gpu_indexes):
        return [Slot(name=f"cpu-{n}", device="cpu") for n in range(workers.cpu_slots)]
    chosen: list[int] = list(gpu_indexes) if isinstance(workers.devices, str) else list(workers.devices)
    missing = [index for index in chosen if index not in gpu_indexes]
    if missing:
        found = ", ".join(str(i) for i in gpu_indexes) or "none"
        raise WhisperdError(
            f"workers.devices lists GPU {', '.join(str(i) for i in missing)}, which NVML does not see "
            f'(GPUs found: {found}); list only present GPUs, or use "auto" or "cpu"'
        )
    return [
        Slot(name=f"gpu{index}-{n}", device=f"cuda:{index}", gpu_index=index)
        for index in chosen
        for n in range(workers.jobs_per_device)
    ]


@dataclass(frozen=True, kw_only=True)
class HealthPolicy:
    """When the pool calls a device or a worker sick (see config.WorkersConfig)."""

    interval_seconds: float = 15.0
    # A worker that has not yet proved itself alive once is still starting
    # (importing torch, initialising CUDA), which can take long on a busy
    # host: it gets at least this long before it is called silent.
    startup_seconds: float = 120.0
    # A job whose progress has not moved for the longer of these is hung.
    hung_min_seconds: float = 300.0
    hung_audio_factor: float = 2.0

    @property
    def silent_worker_seconds(self) -> float:
        """An idle worker that has not proved itself alive this long is sick."""
        return 3 * self.interval_seconds + 5.0

    def hung_after(self, audio_seconds: float | None) -> float:
        return max(self.hung_min_seconds, self.hung_audio_factor * (audio_seconds or 0.0))


def default_cpu_threads(slots: int) -> int:
    """The cores this process may run on, shared out among the slots."""
    return max(1, _usable_cores() // max(1, slots))


def _usable_cores() -> int:
    # The affinity mask, not os.cpu_count(): a process pinned to a few cores
    # (taskset, cpusets) must not size its thread pools for the whole host.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
