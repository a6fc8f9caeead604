"""The GPU hardware seam (stdlib only): `DeviceProbe` and what it returns.

Read by the pool (health, free memory) and by metrics (scrape time);
implemented by `nvml.NvmlProbe` and, on a machine without a GPU, by the
tests' fake (tests/fake_nvml.py), the one swap this seam exists for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Clock event ("throttle") reason bits from nvml.h. They are part of the
# driver's ABI, so they are spelled out here rather than read from pynvml,
# which is only imported once a probe is first used. Only reasons that mean
# the card is in trouble are named; idle, application clocks and the power
# cap are normal operation.
THROTTLE_HW_SLOWDOWN = 0x08
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80

_BAD_THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (THROTTLE_HW_SLOWDOWN, "hw_slowdown"),
    (THROTTLE_SW_THERMAL, "sw_thermal"),
    (THROTTLE_HW_THERMAL, "hw_thermal"),
    (THROTTLE_HW_POWER_BRAKE, "hw_power_brake"),
)

# Every name `bad_throttle_reason_names` can return: a bounded set, fit for labels.
BAD_THROTTLE_REASON_NAMES: tuple[str, ...] = tuple(name for _, name in _BAD_THROTTLE_REASONS)


def bad_throttle_reason_names(mask: int | None) -> tuple[str, ...]:
    """Names of the worrying reasons set in an NVML clock-event bitmask:
    hardware slowdown, thermal slowdown (software or hardware), power brake."""
    if not mask:
        return ()
    return tuple(name for bit, name in _BAD_THROTTLE_REASONS if mask & bit)


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU as found at discovery; fixed for the life of the process."""

    # NVML index (PCI bus order; see devices/nvml.py about CUDA's order).
    index: int
    # Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    name: str
    # Stable identifier, e.g. "GPU-5c3b...", survives reboots and reordering.
    uuid: str
    # Memory on the card in bytes.
    memory_total_bytes: int


@dataclass(frozen=True)
class DeviceReading:
    """One look at a GPU. When `ok` is False only `index` and `error` mean
    anything: the driver could not answer (GPU lost, driver gone, bad index)."""

    index: int
    ok: bool
    # Why the reading failed, in the driver's words; None when ok.
    error: str | None = None
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    memory_free_bytes: int = 0
    # Share of the last sample period the GPU was busy, 0..100; None where the
    # card does not report it (MIG mode, some older boards).
    utilization_percent: float | None = None
    # Core temperature in degrees Celsius; None where not reported.
    temperature_c: float | None = None
    # NVML clock-event reason bitmask; see bad_throttle_reason_names().
    throttle_reasons: int | None = None
    # Uncorrectable ECC errors since the driver loaded; None without ECC.
    ecc_uncorrected: int | None = None

    @classmethod
    def failed(cls, index: int, error: str) -> DeviceReading:
        return cls(index=index, ok=False, error=error)

    @property
    def bad_throttle_reasons(self) -> tuple[str, ...]:
        return bad_throttle_reason_names(self.throttle_reasons)

    @property
    def healthy(self) -> bool:
        """The driver answered, no uncorrectable ECC error has happened since
        the driver loaded (the card needs a reset), and the card is not being
        slowed down by a hardware, thermal or power-brake event."""
        return self.ok and not self.ecc_uncorrected and not self.bad_throttle_reasons


class DeviceProbe(Protocol):
    """What the rest of whisperd may ask about GPUs. Implementations are
    thread-safe and never raise: failures come back as readings with ok=False."""

    def devices(self) -> list[DeviceInfo]:
        """The GPUs present; [] without a GPU or driver."""
        ...

    def read(self, index: int) -> DeviceReading:
        """A fresh reading of one GPU."""
        ...

    def read_process_gpu_memory(self, index: int, pid: int) -> int | None:
        """GPU memory held by one process on one GPU in bytes, or None when the
        driver does not say (unsupported, or the pid is not using the GPU)."""
        ...
