"""Language half: the text decoder and lm_head alone, DeepStack at visual positions, KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from qwen3vl_epd.checkpoint.architecture import architecture
from qwen3vl_epd.checkpoint.reader import LM_HEAD_PREFIX, TEXT_PREFIX, CheckpointReader, load_config, load_module
from qwen3vl_epd.devices import to_device
from qwen3vl_epd.language.greedy_head import GreedyHead, screenable
from qwen3vl_epd.language.packed import PackedLinear, pack_linears, packable
from qwen3vl_epd.language.sampling import Sampler, SamplingParams, finish_reason
from qwen3vl_epd.prompt.encoded import EncodedPrompt


class KVCache:
    """One sequence's keys and values per layer, [1, kv_heads, T, head_dim], grown per chunk."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        return causal_attention(q, *self.append(layer, k, v), scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [1, heads, n, hd] are the last n of the T cached keys/values [1, kv, T, hd];
    returns [n, heads * hd]."""
    n, total = q.shape[2], k.shape[2]
    # query i (absolute total - n + i) sees keys 0..total - n + i
    mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n) if n > 1 else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(n, -1)


class Attention(Protocol):
    """Stores a flat batch's keys and values and computes its attention: [n, heads * head_dim]
    (a KVCache for one sequence; engine/attention.py for the engine's batches)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        ...


@dataclass
class Generation:
    """Output of LanguageModel.generate."""

    tokens: list[int]
    finish_reason: str
    prompt_logits: torch.Tensor | None = None  # [L, vocab] when asked for
    step_logits: list[torch.Tensor] = field(default_factory=list)


def eos_token_ids(checkpoint_dir: str, config) -> set[int]:
    """generation_config.json's eos ids (what transformers' generate stops on), else the config's."""
    try:
        eos = GenerationConfig.from_pretrained(checkpoint_dir, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    eos = config.text_config.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [eos])


class LanguageModel:
    """Loads only `model.language_model.*` and `lm_head.*` (dense or MoE decoder, from the config);
    forwards flat variable-length batches."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 random_weights: bool = False):
        """`random_weights`: made on the device from the config alone (bench/gpu.py's real shapes)."""
        self.config = load_config(checkpoint_dir)
        self.architecture = architecture(self.config, checkpoint_dir)
        tc = self.config.text_config
        self.dtype, self.device = dtype, torch.device(device)
        self.hidden_size = tc.hidden_size
        self.num_deepstack = len(self.config.vision_config.deepstack_visual_indexes)
        self.visual_token_ids = (self.config.image_token_id, self.config.video_token_id)
        self.eos_ids = eos_token_ids(checkpoint_dir, self.config)
        with torch.device("meta" if not random_weights else self.device):
            text = self.architecture.text_model._from_config(tc, dtype=dtype)
            lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False, dtype=dtype)
        self.model = text.eval()
        if not random_weights:
            reader = CheckpointReader(checkpoint_dir)
            load_module(text, reader, TEXT_PREFIX, dtype, self.device)
            tied = tc.tie_word_embeddings or getattr(self.config, "tie_word_embeddings", False)
            if not reader.names((LM_HEAD_PREFIX,)) and tied:
                lm_head.weight = self.model.embed_tokens.weight
            else:
                load_module(lm_head, reader, LM_HEAD_PREFIX, dtype, self.device)
        self.lm_head = lm_head.eval()
        if packable(self.device, dtype) and not random_weights:
            pack_linears(self.model)
            self.lm_head = PackedLinear(self.lm_head)
        # Plain greedy steps' tokens, exact, from a bfloat16 copy of the head (half its size again).
        screened = screenable(self.device, dtype) and not random_weights
        self.greedy_head = GreedyHead(self.lm_head.weight) if screened else None

    def embed(self, fill_ids: torch.Tensor, visual_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embed_tokens(fill_ids) on the device with the visual rows at the image/video pad
        positions, and those positions (a host tensor: fill_ids are host data); ValueError when pads
        and rows disagree."""
        ids = fill_ids.cpu().to(torch.long)
        visual_index = torch.isin(ids, torch.tensor(self.visual_token_ids)).nonzero().flatten()
        if visual_index.numel() != visual_rows.shape[0]:
            raise ValueError(f"{visual_index.numel()} image pads but {visual_rows.shape[0]} embedding rows")
        embeds = self.model.embed_tokens(to_device(ids, self.device))
        if visual_index.numel():
            rows = to_device(visual_rows, self.device).to(self.dtype)
            embeds.index_copy_(0, to_device(visual_index, self.device), rows)
        return embeds, visual_index

    @torch.inference_mode()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The logits at logits_index of hidden(...)."""
        return self.lm_head(self.hidden(*args, **kwargs))

    @torch.inference_mode()
    def hidden(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        visual_index: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flat batch: embeds [N, H], positions [3, N] (long), all on the device; the final normed
        hidden states at logits_index. Nothing here reads or copies host data (device discipline)."""
        x = embeds.to(self.dtype)
        cos, sin = self.model.rotary_emb(x, positions[:, None, :])
        for i, layer in enumerate(self.model.layers):
            x = x + self._attention(layer, i, layer.input_layernorm(x), cos, sin, attention)
            x = x + layer.mlp(layer.post_attention_layernorm(x)[None])[0]
            if deepstack is not None and i < self.num_deepstack and visual_index.numel():
                h = self.hidden_size
                x.index_add_(0, visual_index, deepstack[:, i * h : (i + 1) * h].to(self.dtype))
        return self.model.norm(x if logits_index is None else x.index_select(0, logits_index))

    def _attention(self, layer, layer_idx, h, cos, sin, attention: Attention) -> torch.Tensor:
        attn = layer.self_attn
        n, hd = h.shape[0], attn.head_dim
        q = attn.q_norm(attn.q_proj(h).view(n, -1, hd)).transpose(0, 1)[None]
        k = attn.k_norm(attn.k_proj(h).view(n, -1, hd)).transpose(0, 1)[None]
        v = attn.v_proj(h).view(n, -1, hd).transpose(0, 1)[None]
        q, k = self.architecture.apply_rotary_pos_emb(q, k, cos, sin)
        return attn.o_proj(attention.attend(layer_idx, q, k, v, attn.scaling))

    def prefill(self, prompt: EncodedPrompt, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Prefill one (chunk of a) prompt into `cache`; logits of its last token, or of all."""
        embeds, visual_index = self.embed(prompt.fill_ids, prompt.embeddings)
        n, dev = prompt.length, self.device
        return self.forward(
            embeds,
            to_device(prompt.mrope_positions.T.to(torch.long), dev),
            cache,
            to_device(visual_index, dev),
            to_device(prompt.deepstack, dev) if self.num_deepstack else None,
            None if all_logits else to_device(torch.tensor([n - 1]), dev),
        )

    def decode_step(self, token: int, position: int, cache: KVCache) -> torch.Tensor:
        """One token at M-RoPE position `position` on all three axes; logits [1, vocab]."""
        ids = to_device(torch.tensor([token]), self.device)
        pos = to_device(torch.full((3, 1), position, dtype=torch.long), self.device)
        return self.forward(self.model.embed_tokens(ids), pos, cache)

    def stream(
        self,
        prompt: EncodedPrompt | Iterable[EncodedPrompt],
        params: SamplingParams,
        chunk_size: int | None = None,
        record: Generation | None = None,
    ) -> Iterator[int]:
        """Prefill chunk by chunk (a prompt cut every `chunk_size` tokens, or chunks as they are
        pulled), then yield sampled tokens until EOS or max_tokens; `record` collects logits."""
        sampler, cache = Sampler(params), KVCache(len(self.model.layers))
        chunks = prompt.chunks(chunk_size) if isinstance(prompt, EncodedPrompt) else prompt
        length = delta = 0
        for chunk in chunks:
            logits = self.prefill(chunk, cache, all_logits=record is not None)
            if record is not None:
                before = record.prompt_logits
                record.prompt_logits = logits if before is None else torch.cat([before, logits])
            length, delta, logits = length + chunk.length, chunk.mrope_delta, logits[-1]
        for n in range(1, params.max_tokens + 1):
            if record is not None:
                record.step_logits.append(logits)
            token = sampler(logits)
            yield token
            if finish_reason(params, token in self.eos_ids, n):
                return
            logits = self.decode_step(token, length + n - 1 + delta, cache)[0]

    def generate(
        self,
        prompt: EncodedPrompt | Iterable[EncodedPrompt],
        params: SamplingParams | None = None,
        chunk_size: int | None = None,
        return_logits: bool = False,
    ) -> Generation:
        """All tokens of `stream` at once; single sequence."""
        params = params or SamplingParams()
        result = Generation([], "length")
        result.tokens = list(self.stream(prompt, params, chunk_size, result if return_logits else None))
        if result.tokens:
            result.finish_reason = finish_reason(params, result.tokens[-1] in self.eos_ids, len(result.tokens))
        return result
