"""Device discipline on a CPU-only machine: the model, KV cache and device buffers on PyTorch's
`meta` device, every aten op watched. A step that mixes a host tensor into device work, reads a
device tensor on the host, or copies host data to the device once the forward has begun fails
here as it would stall or fail on CUDA."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
SYNCS = {aten.nonzero, aten._local_scalar_dense, aten.item}  # the host waits for the device's values
COPIES = {aten.to, aten._to_copy, aten.copy_, aten.lift_fresh}  # `to` itself under inference_mode


class DeviceMixError(RuntimeError):
    pass


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class DeviceDiscipline(TorchDispatchMode):
    """Raises on an op whose tensors span devices (a 0-dim host scalar aside, as CUDA allows) and
    on any device→host copy; counts host→device copies, and those made while `in_forward`."""

    def __init__(self):
        super().__init__()
        self.in_forward = False
        self.copies = self.copies_in_forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device.type for t in _tensors((args, kwargs)) if not (t.device.type == "cpu" and t.dim() == 0)}
        if func.overloadpacket in SYNCS and "meta" in devices:
            raise DeviceMixError(f"{func}: reads a device tensor's values on the host (a synchronisation)")
        is_copy = func.overloadpacket in COPIES
        if not is_copy and len(devices) > 1:
            raise DeviceMixError(f"{func}: tensors on {sorted(devices)} in one op")
        out = func(*args, **kwargs)
        if is_copy:
            src, dst = (args[1], args[0]) if func.overloadpacket is aten.copy_ else (args[0], _tensors(out)[0])
            if src.device.type == "meta" and dst.device.type == "cpu":
                raise DeviceMixError(f"{func}: a device tensor read on the host (a synchronisation)")
            if src.device.type == "cpu" and dst.device.type == "meta":
                self.copies += 1
                self.copies_in_forward += self.in_forward
        return out
