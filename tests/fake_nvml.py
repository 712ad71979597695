"""pynvml as the nvidia-ml-py package exposes it, for two GPUs: the one mock this project permits
(NVML needs an NVIDIA driver, which the test machine does not have)."""

from __future__ import annotations

import types


class FakeNvml(types.ModuleType):
    """Two GPUs: a 96 GB workstation card running one worker (pid 4242), and an H200 whose
    temperature sensor fails when `fail_temperature` is set."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, fail_temperature: bool = False) -> None:
        super().__init__("pynvml")
        self.inits = 0
        self.fail_temperature = fail_temperature
        self.processes = [(4242, 30 * 2**30)]  # (pid, bytes) on GPU 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    @staticmethod
    def uuid(h) -> str:
        return ("GPU-5f3a9c1e-0d4b-4e7a-9b2c-61a8f0d3e2b4", "GPU-a7c04e92-3b1f-4d68-8e5a-0f9b2c7d1e63")[h]

    def nvmlDeviceGetUUID(self, h):
        return self.uuid(h)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for h in range(self.nvmlDeviceGetCount()):
            if self.uuid(h) == (uuid.decode() if isinstance(uuid, bytes) else uuid):
                return h
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetName(self, h):
        return "NVIDIA RTX PRO 6000 Blackwell" if h == 0 else b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        used, total = (40 if h == 0 else 10) * 2**30, (96 if h == 0 else 141) * 2**30
        return types.SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=87 if h == 0 else 3)

    def nvmlDeviceGetTemperature(self, h, sensor):
        if self.fail_temperature and h == 1:
            raise self.NVMLError("Not Supported")
        return 61

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes] if h == 0 else []
