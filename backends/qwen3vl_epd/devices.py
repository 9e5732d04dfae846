"""Where tensors live: host memory (pinned when a GPU reads it) and copies to the model's device.

The rule (docs/design.md, device discipline): control data the host reads stays in host memory;
what the model computes on lives on its device, and reaches it in copies made before a forward
starts. On CUDA those copies go through pinned memory without blocking the host."""

from __future__ import annotations

import importlib.metadata

import torch


def host_zeros(*shape: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A host tensor; pinned when `device` is a GPU (copies to it are then asynchronous)."""
    return torch.zeros(*shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`t` on `device` (itself when it is there); host data goes to CUDA through pinned memory
    with a non-blocking copy."""
    device = torch.device(device)
    if t.device == device or (t.device.type == device.type and device.index is None):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def transfers_device_memory() -> bool:
    """True with Mooncake's CUDA build (`mooncake-transfer-engine`); the non-CUDA build can read
    and write only host memory."""
    try:
        importlib.metadata.distribution("mooncake-transfer-engine")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def visual_device(device: str | torch.device) -> torch.device:
    """Where staged embeddings and DeepStack rows live: on the GPU when Mooncake can move device
    memory, else in (pinned) host memory."""
    device = torch.device(device)
    if device.type == "cpu" or (device.type == "cuda" and not transfers_device_memory()):
        return torch.device("cpu")
    return device
