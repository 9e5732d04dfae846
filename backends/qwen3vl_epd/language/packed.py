"""Linear layers with their weights in oneDNN's blocked layout, for float32 on CPU: decode steps
multiply a few rows by large weights (lm_head: 151936 × H), where F.linear's plain layout runs at
half the speed of a layout packed once for small batches (profiled on a 311 M checkpoint: the
lm_head was two thirds of a decode step)."""

from __future__ import annotations

import torch
from torch import nn

PACK_BATCH = 64  # the batch size oneDNN lays the weights out for; measured good from 1 to 32 rows


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """`linear`'s forward on a packed copy of its weight. The plain weight stays a parameter (the
    state dict, a tied lm_head's embeddings): the price is that weight twice in memory."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by its PackedLinear; how many were."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
