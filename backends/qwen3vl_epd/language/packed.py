"""Linear layers and MoE experts with their weights in oneDNN's blocked layout, for float32 on CPU:
decode steps multiply a few rows by large weights (lm_head: 151936 × H; each expert a few rows),
where F.linear's plain layout, and grouped_mm's strided view of it, run at half the speed of a
layout packed once for small batches (profiled on a 311 M checkpoint: the lm_head was two thirds
of a one-sequence step, the experts a third of a sixteen-sequence one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_BATCH = 64  # the batch size oneDNN lays the weights out for; measured good from 1 to 32 rows
# More rows than this go to F.linear on the plain weight: as fast there (compute-bound), and oneDNN
# caches a primitive per row count, up to 1024 (LRU_CACHE_CAPACITY): a prefill's arbitrary row
# counts grew the process by 15% over 200 requests of a soak.
PACKED_ROWS = 32
# The experts' dense path computes tokens × experts rows; up to this many it beats a call per
# expert when the batch reaches most experts (16-expert checkpoint, 2 cores: 0.72 of the time at
# 16 tokens, 0.76 at 8; not at 1 or 64). A 128-expert top-8 model never takes it: it reaches most
# experts only from 16 tokens on, 2048 rows.
DENSE_EXPERT_ROWS = 256


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)


def _linear(rows: torch.Tensor, packed: torch.Tensor, plain: torch.Tensor, bias: torch.Tensor | None = None):
    if rows.shape[0] > PACKED_ROWS:
        return F.linear(rows, plain.detach(), bias)
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`linear`'s forward on a packed copy of its weight. The plain weight stays a parameter (the
    state dict, a tied lm_head's embeddings): the price is that weight twice in memory."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        out = _linear(x.reshape(-1, self.in_features), self.packed, self.weight, bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def packable_experts(module: nn.Module) -> bool:
    """transformers' fused MoE experts in the module layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
            and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
            and not getattr(module, "has_bias", False))


class PackedExperts(nn.Module):
    """A MoE layer's experts, packed twice: a linear pair per expert, run only for the experts the
    batch's tokens reach (prefill, one token), and all experts side by side in one pair, for small
    batches that reach most experts anyway (one call instead of two per expert). The plain weights
    stay parameters, as PackedLinear's do."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn
        self.num_experts, self.intermediate = self.gate_up_proj.shape[0], self.down_proj.shape[2]
        self.gate_up = [_pack(w) for w in self.gate_up_proj]
        self.down = [_pack(w) for w in self.down_proj]
        e, i = self.num_experts, self.intermediate
        self.all_gate_up = _pack(self.gate_up_proj.reshape(e * 2 * i, -1))  # [E·2I, H]
        self.all_down = _pack(self.down_proj.permute(1, 0, 2).reshape(-1, e * i))  # [H, E·I]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index / top_k_weights [T, k] → [T, H]: Σ_k weight · expert(hidden)."""
        tokens, k = top_k_index.shape
        if tokens * k >= self.num_experts and tokens * self.num_experts <= DENSE_EXPERT_ROWS and tokens <= PACKED_ROWS:
            return self._dense(hidden, top_k_index, top_k_weights)
        return self._routed(hidden, top_k_index, top_k_weights)

    def _dense(self, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        # Every expert on every token, weighted by its routing weight (0 where not routed): the
        # down projection's one product over E·I sums the experts.
        tokens, e, i = hidden.shape[0], self.num_experts, self.intermediate
        gate_up = _linear(hidden, self.all_gate_up, None).view(tokens, e, 2 * i)
        act = self.act_fn(gate_up[..., :i]) * gate_up[..., i:]
        act *= torch.zeros(tokens, e, dtype=act.dtype).scatter_(1, top_k_index, top_k_weights.to(act.dtype))[..., None]
        return _linear(act.view(tokens, e * i), self.all_down, None)

    def _routed(self, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        tokens, k = top_k_index.shape
        experts = top_k_index.flatten()
        order = experts.argsort(stable=True)  # (token, expert) pairs grouped by expert
        rows = hidden.index_select(0, order // k)
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(torch.bincount(experts, minlength=self.num_experts).tolist()):
            if n:
                gate, up = _linear(rows[start : start + n], self.gate_up[e], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[start : start + n] = _linear(self.act_fn(gate) * up, self.down[e], self.down_proj[e])
                start += n
        out *= top_k_weights.flatten()[order, None].to(out.dtype)
        # Back to (token, k) order and summed over k, as transformers' grouped_mm path sums.
        return torch.empty_like(out).index_copy_(0, order, out).view(tokens, k, -1).sum(dim=1)


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by its PackedLinear, and fused experts by their
    PackedExperts; how many were."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            count += 1
        elif packable_experts(child):
            setattr(module, name, PackedExperts(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
