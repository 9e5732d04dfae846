"""VisionEncoder: the vision tower alone, one packed forward per batch of prompts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_epd.checkpoint.architecture import architecture
from qwen3vl_epd.checkpoint.reader import VISION_PREFIX, CheckpointReader, load_config, load_module
from qwen3vl_epd.encoder.cache import EncoderCache
from qwen3vl_epd.prompt.encoded import CachedImage, EncodedPrompt
from qwen3vl_epd.prompt.processed import ProcessedPrompt, VisualItem


class LinearPatchEmbed(nn.Module):
    """The patch embedding's Conv3d as one matrix product: its kernel equals its stride, so each
    flattened patch meets the flattened kernel once. oneDNN's 3-D convolution ran it at a sixth of
    the speed (57 of 487 ms of a 640x480 image on one core); `proj` stays, with its state dict."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.proj = embed.proj

    @staticmethod
    def fits(embed: nn.Module) -> bool:
        proj = getattr(embed, "proj", None)
        return isinstance(proj, nn.Conv3d) and list(proj.kernel_size) == list(proj.stride) and proj.groups == 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionEncoder:
    """Loads only `model.visual.*` and turns processed prompts into EncodedPrompts."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 random_weights: bool = False, between_blocks: Callable[[], None] | None = None):
        """`random_weights`: made on the device from the config alone (bench/gpu.py's real shapes).
        `between_blocks`: called before each transformer block of the tower (EncoderService's BlockPace)."""
        self.config = load_config(checkpoint_dir)
        self.dtype, self.device = dtype, torch.device(device)
        vc = self.config.vision_config
        self.hidden_size = vc.out_hidden_size
        self.num_deepstack = len(vc.deepstack_visual_indexes)
        with torch.device("meta" if not random_weights else self.device):
            visual = architecture(self.config, checkpoint_dir).vision_model._from_config(vc, dtype=dtype)
        if not random_weights:
            load_module(visual, CheckpointReader(checkpoint_dir), VISION_PREFIX, dtype, self.device)
        if LinearPatchEmbed.fits(visual.patch_embed):
            visual.patch_embed = LinearPatchEmbed(visual.patch_embed)
        self.visual = visual.eval()
        if between_blocks is not None:
            for block in visual.blocks:
                block.register_forward_pre_hook(lambda module, args: between_blocks())
        self.merge_unit = vc.spatial_merge_size**2
        self.images_encoded = 0  # images and clips through the vision tower (cache hits and repeats are not)

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
            rows = [item.cached or fresh[item.key] for item in p.items(n)]
            embeds = torch.cat([self._empty(0), *(r.embeddings for r in rows)])
            deepstack = torch.cat([self._empty(0, self.num_deepstack), *(r.deepstack for r in rows)])
            results.append(p.encoded(embeds, deepstack))
        return results

    def _forward(self, prompts: list[ProcessedPrompt]) -> dict[object, CachedImage]:
        """Key → encoder output of each distinct image or clip that was not cached. A clip is one
        item of grid (T, H, W): the tower attends within each frame, so it packs with images."""
        todo: dict[object, VisualItem] = {}
        for n, p in enumerate(prompts):
            for item in p.items(n):
                if item.cached is None:
                    todo.setdefault(item.key, item)
        if not todo:
            return {}
        pixels = torch.cat([item.pixels for item in todo.values()]).to(self.device, self.dtype)
        grid = torch.stack([item.grid_thw for item in todo.values()]).to(self.device)
        out = self.visual(pixels, grid_thw=grid, return_dict=True)
        deepstack = torch.cat(list(out.deepstack_features), dim=-1) if self.num_deepstack else None
        self.images_encoded += len(todo)
        fresh, row = {}, 0
        for key, item in todo.items():
            v = int(item.grid_thw.prod()) // self.merge_unit
            ds = deepstack[row:row + v] if deepstack is not None else self._empty(v, 0)
            fresh[key] = CachedImage(item.grid_thw.cpu(), item.size, out.pooler_output[row:row + v], ds,
                                     tuple(item.timestamps))
            row += v
        return fresh

    def _empty(self, rows: int, levels: int = 1) -> torch.Tensor:
        return torch.zeros(rows, levels * self.hidden_size, dtype=self.dtype, device=self.device)
