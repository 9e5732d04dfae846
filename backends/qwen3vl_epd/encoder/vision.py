"""VisionEncoder: the vision tower alone, one packed forward per batch of prompts."""

from __future__ import annotations

import torch

from qwen3vl_epd.checkpoint.architecture import architecture
from qwen3vl_epd.checkpoint.reader import VISION_PREFIX, CheckpointReader, load_config, load_module
from qwen3vl_epd.encoder.cache import EncoderCache
from qwen3vl_epd.prompt.encoded import CachedImage, EncodedPrompt
from qwen3vl_epd.prompt.processor import ProcessedPrompt


def _cached(p: ProcessedPrompt) -> list:
    """Per image of a prompt, its CachedImage or None."""
    return p.cached or [None] * p.num_images


def _key(p: ProcessedPrompt, n: int, i: int) -> object:
    """The content key of image i of prompt n (the batch position when it has none)."""
    return p.image_keys[i] if p.image_keys else (n, i)


class VisionEncoder:
    """Loads only `model.visual.*` and turns processed prompts into EncodedPrompts."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 random_weights: bool = False):
        """`random_weights`: made on the device from the config alone (bench/gpu.py's real shapes)."""
        self.config = load_config(checkpoint_dir)
        self.dtype, self.device = dtype, torch.device(device)
        vc = self.config.vision_config
        self.hidden_size = vc.out_hidden_size
        self.num_deepstack = len(vc.deepstack_visual_indexes)
        with torch.device("meta" if not random_weights else self.device):
            visual = architecture(self.config, checkpoint_dir).vision_model._from_config(vc, dtype=dtype)
        if not random_weights:
            load_module(visual, CheckpointReader(checkpoint_dir), VISION_PREFIX, dtype, self.device)
        self.visual = visual.eval()
        self.merge_unit = vc.spatial_merge_size**2
        self.images_encoded = 0  # images through the vision tower (cache hits and repeats are not)

    @torch.inference_mode()
    def encode(self, prompts: list[ProcessedPrompt], cache: EncoderCache | None = None) -> list[EncodedPrompt]:
        """One packed vision forward over the batch's images that are not cached (an image that
        appears twice is encoded once), split back per prompt; what was encoded goes into `cache`."""
        fresh = self._forward(prompts)
        if cache is not None:
            for key, entry in fresh.items():
                if isinstance(key, bytes):
                    cache.put(key, entry)
        results = []
        for n, p in enumerate(prompts):
            rows = [c or fresh[_key(p, n, i)] for i, c in enumerate(_cached(p))]
            embeds = torch.cat([self._empty(0), *(r.embeddings for r in rows)])
            deepstack = torch.cat([self._empty(0, self.num_deepstack), *(r.deepstack for r in rows)])
            results.append(p.encoded(embeds, deepstack))
        return results

    def _forward(self, prompts: list[ProcessedPrompt]) -> dict[object, CachedImage]:
        """Key → encoder output of each distinct image that was not cached."""
        todo: dict[object, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        for n, p in enumerate(prompts):
            patch = 0
            for i, c in enumerate(_cached(p)):
                if c is not None:
                    continue
                grid = p.image_grid_thw[i]
                count = int(grid.prod())
                todo.setdefault(_key(p, n, i), (p.pixel_values[patch:patch + count], grid, p.image_sizes[i]))
                patch += count
        if not todo:
            return {}
        pixels = torch.cat([t[0] for t in todo.values()]).to(self.device, self.dtype)
        grid = torch.stack([t[1] for t in todo.values()]).to(self.device)
        out = self.visual(pixels, grid_thw=grid, return_dict=True)
        deepstack = torch.cat(list(out.deepstack_features), dim=-1) if self.num_deepstack else None
        self.images_encoded += len(todo)
        fresh, row = {}, 0
        for key, (_, g, size) in todo.items():
            v = int(g.prod()) // self.merge_unit
            ds = deepstack[row:row + v] if deepstack is not None else self._empty(v, 0)
            fresh[key] = CachedImage(g.cpu(), size, out.pooler_output[row:row + v], ds)
            row += v
        return fresh

    def _empty(self, rows: int, levels: int = 1) -> torch.Tensor:
        return torch.zeros(rows, levels * self.hidden_size, dtype=self.dtype, device=self.device)
