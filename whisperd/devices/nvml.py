"""The GPU hardware seam: device discovery, memory, utilisation and health.

Everything else in whisperd sees GPUs only through `devices.probe.DeviceProbe`. `NvmlProbe`
talks to the NVIDIA driver through pynvml (the `nvidia-ml-py` package); the
tests' `fake_nvml.ScriptedProbe` plays back readings they write, so the pool's
health and memory-pressure decisions can be tested on machines without a GPU.

Indices are NVML indices, which follow PCI bus order. CUDA numbers devices
fastest-first unless `CUDA_DEVICE_ORDER=PCI_BUS_ID` is set, and NVML ignores
`CUDA_VISIBLE_DEVICES`: set `CUDA_DEVICE_ORDER=PCI_BUS_ID` in the workers (the
systemd unit does) so that NVML index N and `cuda:N` name the same card.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

import structlog

from whisperd.devices.probe import DeviceInfo, DeviceReading

_log = structlog.stdlib.get_logger(__name__)

_T = TypeVar("_T")


class NvmlProbe:
    """The real probe: NVML through pynvml, initialised on first use.

    `library` is the pynvml module, or anything with the same functions; it
    is imported on first use when not given. No GPU, no driver or no library
    means devices() == [] and failed readings, never an exception. NVML calls
    are serialised by a lock: pynvml's module state is not meant to be driven
    from several threads at once.
    """

    def __init__(self, library: ModuleType | Any | None = None) -> None:
        self._library = library
        self._lock = threading.Lock()
        # None: not tried yet; True: NVML is up; False: it failed to start.
        self._started: bool | None = None
        self._start_error: str | None = None
        # GPUs found at the first successful discovery (None: not yet).
        self._devices: list[DeviceInfo] | None = None

    @property
    def start_error(self) -> str | None:
        """Why NVML could not be started (for `whisperd doctor`), or None."""
        with self._lock:
            return self._start_error

    def devices(self) -> list[DeviceInfo]:
        """The GPUs found by the first successful discovery. They are kept: a
        GPU that later falls off the bus stays listed and reads as failed,
        rather than vanishing from health checks and metrics."""
        with self._lock:
            nvml = self._ensure_started()
            if nvml is None:
                return []
            if self._devices is None:
                self._devices = self._discover(nvml)
            return list(self._devices or [])

    def read(self, index: int) -> DeviceReading:
        with self._lock:
            nvml = self._ensure_started()
            if nvml is None:
                return DeviceReading.failed(index, self._start_error or "NVML is not available")
            try:
                return self._read(nvml, index)
            except nvml.NVMLError as exc:
                return DeviceReading.failed(index, str(exc))

    def read_process_gpu_memory(self, index: int, pid: int) -> int | None:
        """Memory held by `pid` on GPU `index`. NVML reports host pids, so this
        answers None for a process inside another pid namespace."""
        with self._lock:
            nvml = self._ensure_started()
            if nvml is None:
                return None
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                processes = self._compute_processes(nvml, handle)
            except nvml.NVMLError as exc:
                _log.debug("gpu.process_memory_unavailable", index=index, pid=pid, error=str(exc))
                return None
            for process in processes:
                if int(process.pid) == pid and process.usedGpuMemory is not None:
                    return int(process.usedGpuMemory)
            return None

    def close(self) -> None:
        """Shut NVML down; a later call starts it again."""
        with self._lock:
            if self._started and self._library is not None:
                try:
                    self._library.nvmlShutdown()
                except self._library.NVMLError as exc:
                    _log.warning("gpu.shutdown_failed", error=str(exc))
            self._started = None
            self._start_error = None
            self._devices = None

    # -- inside the lock --------------------------------------------------

    def _ensure_started(self) -> Any | None:
        """The NVML library when it is up, else None. Tried once: a machine
        without a driver does not grow one while the daemon runs."""
        if self._started is None:
            self._started = self._start()
        return self._library if self._started else None

    def _start(self) -> bool:
        try:
            if self._library is None:
                import pynvml

                self._library = pynvml
            self._library.nvmlInit()
        except ImportError as exc:
            self._start_error = f"pynvml is not installed: {exc}"
        except OSError as exc:
            self._start_error = f"cannot load NVML: {exc}"
        except Exception as exc:  # noqa: BLE001  (any NVMLError subclass: no driver, no library, no permission)
            self._start_error = f"NVML did not start: {exc}"
        else:
            return True
        _log.info("gpu.nvml_unavailable", reason=self._start_error)
        return False

    def _discover(self, nvml: Any) -> list[DeviceInfo] | None:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            _log.warning("gpu.discovery_failed", error=str(exc))
            return None  # try again next time
        found = []
        for index in range(count):
            try:
                found.append(self._describe(nvml, index))
            except nvml.NVMLError as exc:
                # One broken card must not hide the healthy ones.
                _log.warning("gpu.discovery_failed", index=index, error=str(exc))
        return found

    def _describe(self, nvml: Any, index: int) -> DeviceInfo:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return DeviceInfo(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        )

    def _read(self, nvml: Any, index: int) -> DeviceReading:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temperature = _optional(
            nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        throttle = _optional(nvml, lambda: self._throttle_reasons(nvml, handle))
        ecc = _optional(
            nvml,
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            ),
        )
        return DeviceReading(
            index=index,
            ok=True,
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_percent=None if utilization is None else float(utilization),
            temperature_c=None if temperature is None else float(temperature),
            throttle_reasons=None if throttle is None else int(throttle),
            ecc_uncorrected=None if ecc is None else int(ecc),
        )

    @staticmethod
    def _throttle_reasons(nvml: Any, handle: Any) -> int:
        # NVML renamed "throttle reasons" to "clock event reasons" (driver 535);
        # older bindings or drivers only know the old name.
        newer = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if newer is not None:
            try:
                return int(newer(handle))
            except nvml.NVMLError as exc:
                if not _is_missing_function(nvml, exc):
                    raise
        return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    @staticmethod
    def _compute_processes(nvml: Any, handle: Any) -> Sequence[Any]:
        # The newest entry point needs a recent driver; fall back to the v2 one.
        try:
            return list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError as exc:
            if not _is_missing_function(nvml, exc) or not hasattr(
                nvml, "nvmlDeviceGetComputeRunningProcesses_v2"
            ):
                raise
        return list(nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle))


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes for names; newer ones return str.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _is_missing_function(nvml: Any, exc: Exception) -> bool:
    return getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", object())


def _optional(nvml: Any, call: Callable[[], _T]) -> _T | None:
    """A value the card may simply not offer: "not supported" (or "no
    permission") gives None; any other driver error fails the whole reading."""
    try:
        return call()
    except nvml.NVMLError as exc:
        optional_codes = {
            getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", object()),
            getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()),
            getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", object()),
        }
        if getattr(exc, "value", None) in optional_codes:
            return None
        raise
