"""Greedy tokens of a float32 lm_head at bfloat16's cost, exactly: a bfloat16 product screens the
vocabulary, a bound on its error keeps every token that could still be the float32 maximum, and
only those rows are computed again in float32.

On CPU a decode step's lm_head reads its whole weight (151936 × H) for a handful of rows; in
bfloat16 it reads half as much and runs on AMX (311 M checkpoint, 16 rows, 2 cores: 33 → 15 ms)."""

from __future__ import annotations

import torch

from qwen3vl_epd.language.packed import PACK_BATCH

UNIT = 2.0**-9  # bfloat16's unit roundoff (8 significant bits, round to nearest)
FLOAT_UNIT = 2.0**-24
TINY = 2.0**-126  # the smallest normal float32 (and bfloat16)
BLOCK = 64  # tokens whose screened logits are reduced to one maximum before the candidates are sought
# Beyond these many a row (a hidden state near zero: every logit equal) the float32 product of the
# whole head is cheaper than gathering the candidates' rows.
MAX_BLOCKS_PER_ROW, MAX_CANDIDATES_PER_ROW = 32, 64


def screenable(device: torch.device, dtype: torch.dtype) -> bool:
    """float32 on a CPU whose bfloat16 products are fast (AVX512-BF16 or AMX)."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


class GreedyHead:
    """argmax over the vocabulary of hidden @ weight.T, equal to the float32 product's first maximum."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()  # [V, H] float32, shared with the lm_head
        self.screen = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(torch.bfloat16), PACK_BATCH)
        hidden = self.weight.shape[1]
        # |bf16 screen − exact| + |float32 product − exact| is at most this times
        # ‖x‖·max‖w_v‖ ≥ Σ|x_i·w_vi|: the inputs' and the output's roundings, and both sums' (n·u).
        largest = self.weight.norm(dim=1).max().item()
        self.error = (3 * UNIT * 1.01 + 2 * hidden * FLOAT_UNIT) * largest
        # AMX reads bfloat16 subnormals as zero and flushes subnormal sums: at most this much more,
        # times 1 + ‖x‖ (only a hidden state of norm below about 1e-33 would notice).
        self.flushed = 2 * hidden * TINY * (1 + largest)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's token [n] (long), or None when too many tokens are within the screen's error."""
        n, vocab = hidden.shape[0], self.weight.shape[0]
        screen = torch.ops.mkldnn._linear_pointwise(hidden.to(torch.bfloat16), self.screen, None, "none", [], "")
        screen = screen.float()  # exact; CPU reductions over bfloat16 run at a third of float32's speed
        # The maximum of each block of BLOCK tokens (the last block may be short), then the blocks
        # that reach within the margin of the screen's maximum, then their tokens that do: every
        # token that may be the float32 maximum, found in one pass over the logits.
        whole = vocab // BLOCK * BLOCK
        blocks = screen[:, :whole].view(n, whole // BLOCK, BLOCK).amax(-1)
        if whole < vocab:
            blocks = torch.cat([blocks, screen[:, whole:].amax(-1, keepdim=True)], 1)
        norm = hidden.norm(dim=1)
        low = blocks.amax(-1) - 2 * (self.error * norm + self.flushed * (1 + norm))
        rows, block = (blocks >= low[:, None]).nonzero(as_tuple=True)
        if rows.numel() > MAX_BLOCKS_PER_ROW * n:
            return None
        ids = (block[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
        rows = rows.repeat_interleave(BLOCK)
        keep = ids < vocab
        rows, ids = rows[keep], ids[keep]
        keep = screen[rows, ids] >= low[rows]
        rows, ids = rows[keep], ids[keep]
        if ids.numel() > MAX_CANDIDATES_PER_ROW * n:
            return None
        exact = (hidden.index_select(0, rows) * self.weight.index_select(0, ids)).sum(-1)
        best = torch.full((n,), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        first = torch.where(exact == best[rows], ids, vocab)
        tokens = torch.full((n,), vocab).scatter_reduce(0, rows, first, "amin")
        return None if bool((tokens == vocab).any()) else tokens  # a row of NaN has no candidate
