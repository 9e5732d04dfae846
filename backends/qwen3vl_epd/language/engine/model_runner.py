"""ModelRunner: one forward over a flat batch of prompt chunks and decode tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3vl_epd.language.engine.kv_cache import DecodeBatch
from qwen3vl_epd.language.engine.sequence import Sequence
from qwen3vl_epd.language.model import LanguageModel, Segment
from qwen3vl_epd.prompt.encoded import EncodedPrompt


@dataclass
class PreparedChunk:
    """A sequence's next prompt chunk, embedded before the batch is assembled."""

    seq: Sequence
    rows: EncodedPrompt  # the chunk's tokens, positions, visual and DeepStack rows
    embeds: torch.Tensor
    visual_index: torch.Tensor


class ModelRunner:
    def __init__(self, model: LanguageModel):
        self.model = model

    @torch.inference_mode()
    def prepare(self, seq: Sequence, rows: EncodedPrompt) -> PreparedChunk:
        """Embed one sequence's chunk; ValueError (this sequence's alone) when its rows disagree
        with its tokens."""
        return PreparedChunk(seq, rows, *self.model.embed(rows.fill_ids, rows.embeddings))

    @torch.inference_mode()
    def run(self, prefills: list[PreparedChunk], decodes: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences that sample this step (decodes, and prefills on their last chunk) and
        their logits [n, vocab], row i for sequence i."""
        m = self.model
        embeds, positions, segments, visual, deepstack, wanted = [], [], [], [], [], []
        offset = 0
        for p in prefills:
            seq, rows = p.seq, p.rows
            embeds.append(p.embeds)
            positions.append(rows.mrope_positions.T.to(torch.long))
            visual.append(p.visual_index + offset)
            deepstack.append(rows.deepstack)
            segments.append(Segment(seq.kv, rows.length))
            offset += rows.length
            if seq.prefilled + rows.length == seq.prompt_len:  # its last chunk: the first token
                wanted.append((seq, offset - 1))
        if decodes:
            ids = torch.tensor([s.tokens[-1] for s in decodes], device=m.device)
            embeds.append(m.model.embed_tokens(ids))
            pos = torch.tensor([s.prompt_len + len(s.tokens) - 1 + s.mrope_delta for s in decodes])
            positions.append(pos.expand(3, -1))
            segments.append(Segment(DecodeBatch([s.kv for s in decodes]), len(decodes)))
            for s in decodes:
                wanted.append((s, offset))
                offset += 1
        visual_index = torch.cat(visual) if visual else torch.zeros(0, dtype=torch.long)
        ds = torch.cat(deepstack) if deepstack and m.num_deepstack else None
        logits = m.forward(torch.cat(embeds), torch.cat(positions, dim=1), segments, visual_index, ds,
                           torch.tensor([i for _, i in wanted], dtype=torch.long))
        return [seq for seq, _ in wanted], logits
