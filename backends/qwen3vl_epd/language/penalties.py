"""Penalties and biases on one sequence's logits, kept on the logits' device, in vLLM's and
transformers' order: logit_bias, then the repetition penalty (transformers': over the prompt and
the generated tokens), then OpenAI's frequency and presence penalties (over the generated ones)."""

from __future__ import annotations

import torch

from qwen3vl_epd.devices import to_device


class Penalties:
    """A sequence's token counts on the device, updated from the sampled token without a host read."""

    def __init__(self, presence: float, frequency: float, repetition: float, bias: dict[int, float]):
        self.presence, self.frequency, self.repetition, self.bias = presence, frequency, repetition, bias
        self.counts: torch.Tensor | None = None  # [vocab] int32: times each token was generated
        self.seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or generated
        self.bias_ids = self.bias_values = None

    def _state(self, vocab: int, device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids, values = zip(*sorted(self.bias.items())) if self.bias else ((), ())
            self.bias_ids = to_device(torch.tensor(ids, dtype=torch.long), device)
            self.bias_values = to_device(torch.tensor(values, dtype=torch.float32), device)

    def see_prompt(self, fill_ids: torch.Tensor, vocab: int, device: torch.device) -> None:
        """The prompt's tokens count for the repetition penalty (a chunk at a time, before its forward)."""
        self._state(vocab, device)
        if self.repetition != 1.0:
            self.seen.index_fill_(0, to_device(fill_ids.to(torch.long), device), True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A penalised float copy of one [vocab] logits row."""
        self._state(logits.shape[-1], logits.device)
        out = logits.to(torch.float32, copy=True)
        if self.bias:
            out.index_add_(0, self.bias_ids, self.bias_values)
        if self.repetition != 1.0:
            penalised = torch.where(out < 0, out * self.repetition, out / self.repetition)
            out = torch.where(self.seen, penalised, out)
        if self.presence or self.frequency:
            out -= self.frequency * self.counts + self.presence * (self.counts > 0)
        return out

    def observe(self, token: torch.Tensor) -> None:
        """The sampled token (a 0-dim device tensor) counts from now on."""
        index = token.view(1).to(torch.long)
        self.counts.index_add_(0, index, torch.ones(1, dtype=torch.int32, device=index.device))
        self.seen.index_fill_(0, index, True)
