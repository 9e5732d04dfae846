"""ModelRunner: one forward over a flat batch of prompt chunks and decode tokens, and its sampling.

Step metadata (ids, positions, visual and logits indices, KV slots) is built on the host and
copied to the device before the forward; the step's one host synchronisation is reading the
sampled ids (host_tokens)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from qwen3vl_epd.devices import host_zeros, to_device
from qwen3vl_epd.language.engine.attention import step_attention
from qwen3vl_epd.language.engine.sequence import Sequence
from qwen3vl_epd.language.grammar import apply_masks, fill_masks
from qwen3vl_epd.language.model import LanguageModel
from qwen3vl_epd.language.sampling import sample_rows
from qwen3vl_epd.prompt.encoded import EncodedPrompt


@dataclass
class PreparedChunk:
    """A sequence's next prompt chunk, embedded before the batch is assembled."""

    seq: Sequence
    rows: EncodedPrompt  # the chunk's tokens, positions, visual and DeepStack rows
    embeds: torch.Tensor  # on the device
    visual_index: torch.Tensor  # host: rows of the chunk that are visual tokens


def plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that needs the whole logits row (penalties, a grammar, log-probabilities)."""
    return (seq.params.temperature <= 0 and seq.sampler.penalties is None and seq.grammar is None
            and seq.params.logprobs is None)


def host_tokens(values: torch.Tensor) -> list:
    """The step's one device→host synchronisation: the sampled ids (and their log-probabilities)."""
    return values.tolist()


class ModelRunner:
    def __init__(self, model: LanguageModel, attention_backend: str = "sdpa",
                 head_threads: Callable[[], AbstractContextManager] = nullcontext):
        """`head_threads`: entered around the float32 lm_head and sampling (CoreShare.head)."""
        self.model, self.attention_backend, self.head_threads = model, attention_backend, head_threads
        self.to_host = host_tokens
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="epd-grammar")  # beside the forward
        self._pending: Future | None = None

    @torch.inference_mode()
    def prepare(self, seq: Sequence, rows: EncodedPrompt) -> PreparedChunk:
        """Embed one sequence's chunk; ValueError (this sequence's alone) when its rows disagree
        with its tokens."""
        if (penalties := seq.sampler.penalties) is not None:
            penalties.see_prompt(rows.fill_ids, self.model.config.text_config.vocab_size, self.model.device)
        return PreparedChunk(seq, rows, *self.model.embed(rows.fill_ids, rows.embeddings))

    @torch.inference_mode()
    def run(self, prefills: list[PreparedChunk], decodes: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences that sample this step (decodes, and prefills on their last chunk) and
        their final hidden states [n, H] on the device, row i for sequence i (sample's lm_head
        makes them logits)."""
        m, dev = self.model, self.model.device
        self._pending = None
        embeds, positions, visual, deepstack, wanted = [], [], [], [], []
        offset = 0
        for p in prefills:
            seq, rows = p.seq, p.rows
            embeds.append(p.embeds)
            positions.append(rows.mrope_positions.cpu().T.to(torch.long))
            visual.append(p.visual_index + offset)
            deepstack.append(to_device(rows.deepstack, dev))
            offset += rows.length
            if seq.prefilled + rows.length == seq.prompt_len:  # its last chunk: the first token
                wanted.append((seq, offset - 1))
        if decodes:
            embeds.append(m.model.embed_tokens(to_device(torch.tensor([s.tokens[-1] for s in decodes]), dev)))
            pos = torch.tensor([s.prompt_len + len(s.tokens) - 1 + s.mrope_delta for s in decodes])
            positions.append(pos.expand(3, -1))
            for s in decodes:
                wanted.append((s, offset))
                offset += 1
        visual_index = torch.cat(visual) if visual else torch.zeros(0, dtype=torch.long)
        ds = torch.cat(deepstack) if deepstack and m.num_deepstack else None
        # One copy for every index of the step (positions, visual rows, logits rows).
        n_vis = visual_index.numel()
        ints = to_device(torch.cat([torch.cat(positions, dim=1).flatten(), visual_index,
                                    torch.tensor([i for _, i in wanted], dtype=torch.long)]), dev)
        positions, rest = ints[: 3 * offset].view(3, offset), ints[3 * offset :]
        constrained = [seq.grammar for seq, _ in wanted if seq.grammar is not None]
        if constrained:  # computed on the host while the forward runs (llguidance releases the GIL)
            rows = host_zeros(len(constrained), (m.config.text_config.vocab_size + 31) // 32, dtype=torch.int32,
                              device=dev)
            unpack = m.config.text_config.vocab_size if dev.type == "cpu" else None  # a GPU unpacks them faster
            self._pending = self._masks.submit(fill_masks, constrained, rows, unpack)
        attention = step_attention(self.attention_backend, decodes[0].kv.cache if decodes else prefills[0].seq.kv.cache,
                                   [(p.seq.kv, p.rows.length) for p in prefills], [s.kv for s in decodes])
        hidden = m.hidden(torch.cat(embeds), positions, attention, rest[:n_vis], ds, rest[n_vis:])
        return [seq for seq, _ in wanted], hidden

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> tuple[list[int], dict[int, tuple]]:
        """Every row's next token, sampled on the device, and for the rows that ask, (logprob,
        [(id, logprob)] of the most likely): read back in one synchronisation."""
        if self.model.greedy_head is not None and all(plain_greedy(s) for s in seqs):
            tokens = self.model.greedy_head(hidden)
            if tokens is not None:
                return [int(t) for t in self.to_host(tokens)], {}
        with self.head_threads():
            return self._sample(seqs, self.model.lm_head(hidden))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], dict[int, tuple]]:
        masked = {}
        if self._pending is not None:
            masks, self._pending = to_device(self._pending.result(), logits.device), None
            constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
            rows = apply_masks(torch.stack([logits[i] for i in constrained]), masks)
            masked = {i: rows[j] for j, i in enumerate(constrained)}
        tokens = sample_rows(logits, [s.sampler for s in seqs], masked)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return [int(t) for t in self.to_host(tokens)], {}
        n, k = len(seqs), max(seqs[i].params.logprobs for i in rows)
        # Row by row with Python indices: no index tensor to copy to the device after the forward.
        logp = torch.log_softmax(torch.stack([logits[i] for i in rows]).float(), -1)
        chosen = logp.gather(1, torch.stack([tokens[i] for i in rows])[:, None])[:, 0]
        top = logp.topk(k, -1)
        host = self.to_host(torch.cat([tokens.double(), chosen.double(), top.values.flatten().double(),
                                       top.indices.flatten().double()]))
        values, ids = host[n + len(rows) :][: len(rows) * k], host[n + len(rows) :][len(rows) * k :]
        out = {}
        for j, i in enumerate(rows):
            want = seqs[i].params.logprobs
            out[i] = (host[n + j], [(int(ids[j * k + m]), values[j * k + m]) for m in range(want)])
        return [int(t) for t in host[:n]], out
