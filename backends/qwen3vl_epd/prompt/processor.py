"""Prompt processing: chat template, patches, pad expansion, M-RoPE."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen3vl_epd.checkpoint.architecture import architecture
from qwen3vl_epd.checkpoint.reader import load_config
from qwen3vl_epd.errors import ImageTooLargeError, InvalidInputError, PromptTooLongError, TooManyImagesError
from qwen3vl_epd.prompt.encoded import CachedImage, EncodedPrompt, ImageLookup
from qwen3vl_epd.prompt.images import decode_raw, image_data
from qwen3vl_epd.prompt.limits import Limits

IMAGE_MARKER = "<image>"
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class ProcessedPrompt:
    """A prompt ready for the vision tower: pads expanded, patches cut, M-RoPE computed."""

    fill_ids: torch.Tensor  # [L] int64, image pads expanded
    pixel_values: torch.Tensor  # [sum of patches, C*T*P*P] float32
    image_grid_thw: torch.Tensor  # [n_images, 3] int64
    mrope_positions: torch.Tensor  # [3, L] int64
    mrope_delta: int
    image_spans: list = field(default_factory=list)  # (first token, number of pads) per image
    image_sizes: list = field(default_factory=list)  # (width, height) as decoded, per image
    image_keys: list = field(default_factory=list)  # content key per image (Processor.image_key), or none
    cached: list = field(default_factory=list)  # per image: its CachedImage (no patches cut), or None

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def encoded(self, embeddings: torch.Tensor, deepstack: torch.Tensor) -> EncodedPrompt:
        """This prompt with its visual rows (none for text only), in the staged layout."""
        return EncodedPrompt(
            fill_ids=self.fill_ids.to(torch.int32), mrope_positions=self.mrope_positions.T.contiguous().to(torch.int32),
            embeddings=embeddings, deepstack=deepstack, mrope_delta=self.mrope_delta, image_spans=self.image_spans,
            image_keys=list(self.image_keys),
        )


class Processor:
    """Turns a user message (text plus raw image bytes) into a ProcessedPrompt."""

    def __init__(self, checkpoint_dir: str | Path, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.config = load_config(checkpoint_dir)
        self.architecture = architecture(self.config, checkpoint_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
        pp = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
        pp.pop("image_processor_type", None)
        self.image_processor = Qwen2VLImageProcessorPil(**pp)
        # Everything that shapes an image's patches besides its bytes: part of its cache key.
        self.fingerprint = hashlib.sha256(json.dumps(pp, sort_keys=True).encode()).digest()
        self.merge_size = self.image_processor.merge_size
        self.image_token_id = self.config.image_token_id
        # get_rope_index only needs the config and get_vision_position_ids (which ignores self);
        # this lets us call transformers' own M-RoPE code without building the model.
        self._rope_owner = SimpleNamespace(
            config=self.config,
            get_vision_position_ids=lambda *a, **k: self.architecture.model.get_vision_position_ids(None, *a, **k),
        )

    def build_prompt(self, text: str, num_images: int, raw_prompt: bool = False) -> str:
        """The templated prompt: `<image>` markers or leading images become vision placeholders."""
        if raw_prompt:
            found = text.count(VISION_PLACEHOLDER)
            if found != num_images:
                raise InvalidInputError(
                    f"text_input: raw prompt has {found} '{VISION_PLACEHOLDER}' placeholders but "
                    f"{num_images} images were sent"
                )
            return text
        markers = text.count(IMAGE_MARKER)
        if markers and markers != num_images:
            raise InvalidInputError(
                f"text_input: {markers} '{IMAGE_MARKER}' markers but {num_images} images were sent; they must match"
            )
        if markers:
            content = []
            for i, part in enumerate(text.split(IMAGE_MARKER)):
                if i:
                    content.append({"type": "image"})
                if part:
                    content.append({"type": "text", "text": part})
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.apply_chat_template([{"role": "user", "content": content}])

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The checkpoint's chat template with the generation prompt (and `tools`), untokenized."""
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)

    def image_key(self, data: bytes) -> bytes:
        """Full SHA-256 of an image's raw bytes and the processor settings: its encoder cache key."""
        return hashlib.sha256(self.fingerprint + data).digest()

    def process(self, text: str, images: list[bytes] = (), raw_prompt: bool = False,
                cache: ImageLookup | None = None) -> ProcessedPrompt:
        """The semantics of `text_input` + `image` + `raw_prompt` (README: Interface); an image found in `cache`
        is neither decoded nor cut into patches."""
        if len(images) > self.limits.max_images:
            raise TooManyImagesError(
                f"image: {len(images)} images is over the limit of {self.limits.max_images} per prompt"
            )
        prompt = self.build_prompt(text, len(images), raw_prompt)
        data = [image_data(d, i, self.limits) for i, d in enumerate(images)]
        keys = [self.image_key(d) for d in data]
        found = [cache.get(k) if cache is not None else None for k in keys]
        decoded = [c or decode_raw(d, i, self.limits) for i, (d, c) in enumerate(zip(data, found))]
        return self.process_prompt(prompt, decoded, keys)

    def process_prompt(self, prompt: str, images: list, keys: list[bytes] = ()) -> ProcessedPrompt:
        """A templated prompt with one vision placeholder per image (decoded, or a CachedImage)
        → ProcessedPrompt; patches only for the decoded ones."""
        pixel_values = [torch.zeros(0, self._patch_dim(), dtype=torch.float32)]
        grids, sizes = [torch.zeros(0, 3, dtype=torch.int64)], []
        for i, image in enumerate(images):
            if isinstance(image, CachedImage):
                grids.append(image.grid_thw[None])
                sizes.append(image.size)
            else:
                pv, grid = self._patch(image, i)
                pixel_values.append(pv)
                grids.append(grid)
                sizes.append(image.size)
        grid_thw = torch.cat(grids)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        fill_ids, spans = self._expand_pads(ids, grid_thw)
        if fill_ids.numel() > self.limits.max_prompt_tokens:
            raise PromptTooLongError(
                f"text_input: prompt is {fill_ids.numel()} tokens after image expansion, over the "
                f"max model length of {self.limits.max_prompt_tokens}"
            )
        positions, delta = self.rope_index(fill_ids, grid_thw)
        return ProcessedPrompt(
            fill_ids=fill_ids,
            pixel_values=torch.cat(pixel_values),
            image_grid_thw=grid_thw,
            mrope_positions=positions,
            mrope_delta=delta,
            image_spans=spans,
            image_sizes=sizes,
            image_keys=list(keys),
            cached=[image if isinstance(image, CachedImage) else None for image in images],
        )

    def rope_index(self, fill_ids: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, L] and delta, by transformers' get_rope_index."""
        if grid_thw.shape[0] == 0:
            L = fill_ids.numel()
            return torch.arange(L, dtype=torch.int64).expand(3, L).clone(), 0
        ids = fill_ids[None]
        mm_types = (ids == self.image_token_id).to(torch.int32)
        pos, delta = self.architecture.model.get_rope_index(self._rope_owner, ids, mm_types, image_grid_thw=grid_thw)
        return pos[:, 0].to(torch.int64), int(delta.item())

    def _patch_dim(self) -> int:
        ip = self.image_processor
        return 3 * ip.temporal_patch_size * ip.patch_size * ip.patch_size

    def _patch(self, image: Image.Image, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's patches [n, C*T*P*P] float32 and grid [1, 3]."""
        try:
            out = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as e:  # smart_resize: aspect ratio over 200
            raise ImageTooLargeError(
                index, f"{image.size[0]}x{image.size[1]} is rejected by the image processor's aspect ratio "
                f"limit (200): {e}"
            ) from None
        return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.int64)

    def _expand_pads(self, ids: list[int], grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        tokens_per_image = (grid_thw.prod(-1) // (self.merge_size**2)).tolist()
        found = ids.count(self.image_token_id)
        if found != len(tokens_per_image):
            raise InvalidInputError(
                f"text_input: {found} image placeholders in the prompt but {len(tokens_per_image)} images"
            )
        out, spans = [], []
        for t in ids:
            if t == self.image_token_id:
                n = tokens_per_image[len(spans)]
                spans.append((len(out), n))
                out.extend([t] * n)
            else:
                out.append(t)
        return torch.tensor(out, dtype=torch.int64), spans
