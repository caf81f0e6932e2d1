"""Devices: where the frame pool lives and forward passes run.

`cpu` and `cuda[:N]` hold real tensors (kernel/devices/torchdev.py); `sim:<gpu>`
counts frames and prices steps with a cost model (kernel/devices/sim.py).
"""
from kernel.errors import EINVAL, KvosError


def make_device(name):
    from kernel.devices.base import Device
    if isinstance(name, Device):
        return name
    if not isinstance(name, str):
        raise KvosError(EINVAL, f"device must be 'cpu', 'cuda' or 'sim:<gpu>', got {name!r}")
    if name == "cpu" or name == "cuda" or name.startswith("cuda:"):
        from kernel.devices.torchdev import TorchDevice
        return TorchDevice(name)
    if name.startswith("sim:") or name == "sim":
        from kernel.devices.sim import SimDevice
        return SimDevice(name)
    raise KvosError(EINVAL, f"unknown device {name!r}: use 'cpu', 'cuda' or 'sim:<gpu>'")
