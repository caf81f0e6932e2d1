"""Devices: where the frame pool lives and forward passes run.

`cpu` and `cuda[:N]` hold real tensors (kernel/devices/torchdev.py); `sim:<gpu>`
counts frames and prices steps with a cost model (kernel/devices/sim.py); `cpu` with tp > 1
splits every layer over tp processes (kernel/devices/tp.py).
"""
from kernel.errors import EINVAL, KvosError


def make_device(name, tp: int = 1, threads=None):
    """The device called `name`; tp > 1 splits it over tp processes (kernel/devices/tp.py)."""
    from kernel.devices.base import Device
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 64:
        raise KvosError(EINVAL, f"tp must be an integer in [1, 64], got {tp!r}")
    if tp > 1:
        if isinstance(name, Device):
            raise KvosError(EINVAL, "tp > 1 takes a device name, not a device object")
        from kernel.devices.tp import TPDevice
        return TPDevice(name, tp, threads)
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
