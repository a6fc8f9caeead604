"""The GPU seam: the real NVML probe on this (GPU-less) machine, the same probe
driven through a stand-in NVML library (the hardware seam, the one place a fake
is allowed), and the scripted probe other tests use."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from tests.fake_nvml import ScriptedProbe, idle_reading
from whisperd.devices.nvml import NvmlProbe
from whisperd.devices.probe import (
    BAD_THROTTLE_REASON_NAMES,
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_THERMAL,
    DeviceInfo,
    DeviceReading,
    bad_throttle_reason_names,
)

GIB = 1024**3
H100 = DeviceInfo(
    index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-11111111-2222", memory_total_bytes=80 * GIB
)

# Bits that are normal operation: idle (0x1), application clocks (0x2), power cap (0x4).
BENIGN_THROTTLE = 0x1 | 0x2 | 0x4


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class StandInNvml:
    """Stands in for the NVIDIA driver behind pynvml's function names, with
    pynvml's real error classes and constants. `fail` maps a function name to
    an NVML error code it raises until cleared."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND

    def __init__(self, gpus: int = 2) -> None:
        self.gpus = gpus
        self.fail: dict[str, int] = {}
        self.fail_index: dict[str, int] = {}
        self.used = [10 * GIB] * gpus
        self.throttle = 0
        self.inits = 0
        self.processes: list[Any] = []

    def _call(self, name: str, index: int | None = None) -> None:
        code = self.fail.get(name)
        if code is not None and (name not in self.fail_index or self.fail_index[name] == index):
            raise nvml_error(code)

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < self.gpus:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._call("nvmlDeviceGetName", handle)
        return b"NVIDIA H100 80GB HBM3"  # old pynvml releases return bytes

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:08d}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo", handle)
        total = 80 * GIB
        return SimpleNamespace(total=total, used=self.used[handle], free=total - self.used[handle])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 61

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        self._call("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return self.throttle

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return self.throttle

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter_type: int) -> int:
        self._call("nvmlDeviceGetTotalEccErrors", handle)
        assert (error_type, counter_type) == (
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        return 0

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return self.processes

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: int) -> list[Any]:
        return self.processes


# -- the real probe on a machine without an NVIDIA driver ----------------------


def test_real_probe_without_a_driver_finds_no_gpu_and_never_raises() -> None:
    probe = NvmlProbe()
    try:
        if probe.devices():
            pytest.skip("this machine has an NVIDIA GPU")
        reading = probe.read(0)
        assert reading == DeviceReading.failed(0, reading.error or "")
        assert not reading.ok and not reading.healthy
        assert reading.error
        assert probe.start_error == reading.error
        assert probe.read_process_gpu_memory(0, 1) is None
    finally:
        probe.close()


def test_real_probe_serves_many_threads_at_once() -> None:
    probe = NvmlProbe()
    results: list[int] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(20):
                results.append(len(probe.devices()))
                probe.read(0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    probe.close()
    assert not errors
    assert len(results) == 80 and len(set(results)) == 1


# -- the real probe's logic over a stand-in driver -----------------------------


def test_the_stand_in_only_offers_what_the_real_binding_has() -> None:
    # The probe runs against the stand-in below; this keeps a misspelt NVML
    # name from passing here and failing on a real GPU.
    names = [name for name in dir(StandInNvml) if name.lower().startswith("nvml")]
    assert len(names) > 15
    assert [name for name in names if not hasattr(pynvml, name)] == []


def test_discovery_names_each_gpu() -> None:
    probe = NvmlProbe(StandInNvml(gpus=2))
    devices = probe.devices()
    assert [d.index for d in devices] == [0, 1]
    assert devices[0].name == "NVIDIA H100 80GB HBM3"  # bytes decoded
    assert devices[1].uuid == "GPU-00000001"
    assert devices[0].memory_total_bytes == 80 * GIB


def test_a_gpu_lost_after_discovery_stays_listed_and_reads_as_failed() -> None:
    nvml = StandInNvml(gpus=2)
    probe = NvmlProbe(nvml)
    assert len(probe.devices()) == 2
    nvml.fail["nvmlDeviceGetName"] = pynvml.NVML_ERROR_GPU_IS_LOST
    nvml.fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_GPU_IS_LOST
    nvml.fail_index.update(nvmlDeviceGetName=1, nvmlDeviceGetMemoryInfo=1)
    assert [d.index for d in probe.devices()] == [0, 1]
    assert probe.read(0).ok and not probe.read(1).ok


def test_nvml_is_started_once_lazily_and_again_after_close() -> None:
    nvml = StandInNvml()
    probe = NvmlProbe(nvml)
    assert nvml.inits == 0
    probe.devices()
    probe.read(0)
    assert nvml.inits == 1
    probe.close()
    assert nvml.inits == 0
    probe.read(1)
    assert nvml.inits == 1


def test_a_reading_carries_memory_utilization_temperature_and_health() -> None:
    nvml = StandInNvml()
    nvml.used[1] = 30 * GIB
    reading = NvmlProbe(nvml).read(1)
    assert reading.ok and reading.healthy
    assert (reading.memory_used_bytes, reading.memory_free_bytes) == (30 * GIB, 50 * GIB)
    assert reading.utilization_percent == 87.0
    assert reading.temperature_c == 61.0
    assert reading.ecc_uncorrected == 0


def test_a_driver_error_gives_a_failed_reading_and_the_gpu_recovers() -> None:
    nvml = StandInNvml()
    probe = NvmlProbe(nvml)
    nvml.fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_GPU_IS_LOST
    lost = probe.read(0)
    assert not lost.ok and not lost.healthy
    assert lost.error is not None and "GPU is lost" in lost.error
    del nvml.fail["nvmlDeviceGetMemoryInfo"]
    assert probe.read(0).ok


def test_unsupported_values_are_none_and_the_reading_stays_ok() -> None:
    nvml = StandInNvml()
    nvml.fail["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # MIG mode
    nvml.fail["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # ECC off
    reading = NvmlProbe(nvml).read(0)
    assert reading.ok and reading.healthy
    assert reading.utilization_percent is None and reading.ecc_uncorrected is None
    assert reading.temperature_c == 61.0


def test_an_unknown_index_is_a_failed_reading() -> None:
    reading = NvmlProbe(StandInNvml(gpus=1)).read(5)
    assert not reading.ok and reading.index == 5 and reading.error


def test_old_drivers_fall_back_to_the_throttle_reasons_call() -> None:
    nvml = StandInNvml()
    nvml.throttle = THROTTLE_HW_THERMAL
    nvml.fail["nvmlDeviceGetCurrentClocksEventReasons"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    reading = NvmlProbe(nvml).read(0)
    assert reading.ok and reading.throttle_reasons == THROTTLE_HW_THERMAL
    assert reading.bad_throttle_reasons == ("hw_thermal",) and not reading.healthy


def test_one_broken_gpu_does_not_hide_the_others_at_discovery() -> None:
    nvml = StandInNvml(gpus=3)
    nvml.fail["nvmlDeviceGetName"] = pynvml.NVML_ERROR_GPU_IS_LOST
    nvml.fail_index["nvmlDeviceGetName"] = 1
    assert [d.index for d in NvmlProbe(nvml).devices()] == [0, 2]


def test_a_driver_that_fails_to_start_means_no_gpus() -> None:
    nvml = StandInNvml()
    nvml.fail["nvmlInit"] = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    probe = NvmlProbe(nvml)
    assert probe.devices() == []
    assert not probe.read(0).ok
    assert probe.start_error is not None and "Driver Not Loaded" in probe.start_error


def test_process_gpu_memory_is_read_per_pid() -> None:
    nvml = StandInNvml()
    nvml.processes = [
        SimpleNamespace(pid=4242, usedGpuMemory=3 * GIB),
        SimpleNamespace(pid=7, usedGpuMemory=None),
    ]
    probe = NvmlProbe(nvml)
    assert probe.read_process_gpu_memory(0, 4242) == 3 * GIB
    assert probe.read_process_gpu_memory(0, 7) is None  # the driver does not say
    assert probe.read_process_gpu_memory(0, 99) is None
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    assert probe.read_process_gpu_memory(0, 4242) == 3 * GIB  # the v2 call


# -- health rules ------------------------------------------------------------


def test_only_worrying_throttle_reasons_are_named() -> None:
    assert bad_throttle_reason_names(BENIGN_THROTTLE) == ()
    assert bad_throttle_reason_names(None) == ()
    everything = THROTTLE_HW_SLOWDOWN | THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL | THROTTLE_HW_POWER_BRAKE
    assert bad_throttle_reason_names(everything | BENIGN_THROTTLE) == BAD_THROTTLE_REASON_NAMES
    assert bad_throttle_reason_names(THROTTLE_HW_POWER_BRAKE | 0x4) == ("hw_power_brake",)


def test_the_bits_match_the_nvml_binding() -> None:
    assert pynvml.nvmlClocksEventReasonHwSlowdown == THROTTLE_HW_SLOWDOWN
    assert pynvml.nvmlClocksEventReasonSwThermalSlowdown == THROTTLE_SW_THERMAL
    assert pynvml.nvmlClocksEventReasonHwThermalSlowdown == THROTTLE_HW_THERMAL
    assert pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown == THROTTLE_HW_POWER_BRAKE


@pytest.mark.parametrize(
    ("fields", "healthy"),
    [
        ({}, True),
        ({"throttle_reasons": BENIGN_THROTTLE}, True),
        ({"throttle_reasons": THROTTLE_HW_SLOWDOWN}, False),
        ({"ecc_uncorrected": 2}, False),
        ({"ecc_uncorrected": None, "throttle_reasons": None}, True),
    ],
)
def test_health_of_a_reading(fields: dict[str, Any], healthy: bool) -> None:
    assert idle_reading(H100, **fields).healthy is healthy


# -- the scripted probe ------------------------------------------------------


def test_scripted_probe_fails_then_recovers_and_the_last_reading_sticks() -> None:
    busy = idle_reading(H100, used_bytes=70 * GIB)
    probe = ScriptedProbe([H100], {0: ["GPU is lost", "GPU is lost", busy]})
    first, second = probe.read(0), probe.read(0)
    assert not first.ok and first.error == "GPU is lost" and not second.ok
    assert [probe.read(0) for _ in range(3)] == [busy, busy, busy]
    assert probe.reads(0) == 5


def test_scripted_probe_defaults_to_idle_and_knows_its_devices() -> None:
    probe = ScriptedProbe([H100])
    assert probe.devices() == [H100]
    reading = probe.read(0)
    assert reading.healthy and reading.memory_free_bytes == H100.memory_total_bytes
    assert not probe.read(3).ok
    probe.script(0, "Unknown Error")
    assert probe.read(0).error == "Unknown Error"
    probe.script(0, reading)  # replaces the repeating error at once
    assert probe.read(0) == reading
    probe.set_devices([])
    assert probe.devices() == [] and not probe.read(0).ok


def test_scripted_probe_reports_process_memory() -> None:
    probe = ScriptedProbe([H100], process_memory={(0, 100): GIB})
    assert probe.read_process_gpu_memory(0, 100) == GIB
    probe.set_process_memory(0, 100, None)
    assert probe.read_process_gpu_memory(0, 100) is None
