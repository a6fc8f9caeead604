"""A fake NVML for machines without a GPU: the only fake the tests use, at
the hardware seam. `ScriptedProbe` implements `whisperd.devices.probe.DeviceProbe` by
playing back readings a test scripts; the real path (`NvmlProbe`) is checked
on a GPU machine (bench/gpu_check.py)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from whisperd.devices.probe import DeviceInfo, DeviceReading

# A scripted reading: a full reading, or a string standing for a failed one.
ScriptedItem = DeviceReading | str


class ScriptedProbe:
    """The fake for tests of health and memory-pressure decisions.

    Each read(index) takes the next scripted item for that device; the last
    item repeats until more are scripted, so "fail twice, then recover" is
    `script(0, "GPU is lost", "GPU is lost", reading)`. A device with no
    script reads as healthy and idle. Strings stand for failed readings.
    """

    def __init__(
        self,
        devices: Iterable[DeviceInfo] = (),
        readings: Mapping[int, Sequence[ScriptedItem]] | None = None,
        process_memory: Mapping[tuple[int, int], int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._devices = list(devices)
        self._scripts: dict[int, deque[ScriptedItem]] = {
            index: deque(items) for index, items in (readings or {}).items()
        }
        self._process_memory = dict(process_memory or {})
        self._reads: dict[int, int] = {}
        # Devices whose script is down to its last item, already read once.
        self._repeating: set[int] = set()

    def devices(self) -> list[DeviceInfo]:
        with self._lock:
            return list(self._devices)

    def read(self, index: int) -> DeviceReading:
        with self._lock:
            self._reads[index] = self._reads.get(index, 0) + 1
            info = next((d for d in self._devices if d.index == index), None)
            if info is None:
                return DeviceReading.failed(index, f"no GPU with index {index}")
            script = self._scripts.get(index)
            if not script:
                return idle_reading(info)
            if len(script) > 1:
                item = script.popleft()
            else:
                item = script[0]
                self._repeating.add(index)
            return DeviceReading.failed(index, item) if isinstance(item, str) else item

    def read_process_gpu_memory(self, index: int, pid: int) -> int | None:
        with self._lock:
            return self._process_memory.get((index, pid))

    def script(self, index: int, *items: ScriptedItem) -> None:
        """Queue readings for a device after those not yet read. A last item
        already being repeated is dropped: the new script takes over."""
        with self._lock:
            script = self._scripts.setdefault(index, deque())
            if index in self._repeating:
                script.clear()
                self._repeating.discard(index)
            script.extend(items)

    def set_devices(self, devices: Iterable[DeviceInfo]) -> None:
        with self._lock:
            self._devices = list(devices)

    def set_process_memory(self, index: int, pid: int, used_bytes: int | None) -> None:
        with self._lock:
            if used_bytes is None:
                self._process_memory.pop((index, pid), None)
            else:
                self._process_memory[(index, pid)] = used_bytes

    def reads(self, index: int) -> int:
        """How many times read(index) was called."""
        with self._lock:
            return self._reads.get(index, 0)


def idle_reading(info: DeviceInfo, *, used_bytes: int = 0, **fields: Any) -> DeviceReading:
    """A healthy reading of `info` with `used_bytes` in use; other fields
    (temperature_c, throttle_reasons...) may be given as keywords."""
    values: dict[str, Any] = {
        "utilization_percent": 0.0,
        "temperature_c": 35.0,
        "throttle_reasons": 0,
        "ecc_uncorrected": 0,
    }
    values.update(fields)
    return DeviceReading(
        index=info.index,
        ok=True,
        memory_total_bytes=info.memory_total_bytes,
        memory_used_bytes=used_bytes,
        memory_free_bytes=max(info.memory_total_bytes - used_bytes, 0),
        **values,
    )
