"""Devices: the GPU hardware seam.

`probe.DeviceProbe` is what the pool and metrics read; `nvml.NvmlProbe`
implements it with NVML (the tests' fake implements it on a machine
without a GPU). May import: nothing of whisperd's but the stdlib.
"""
