"""Prompt processing: chat template, patches, pad expansion, M-RoPE."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen3vl_epd.checkpoint.architecture import architecture
from qwen3vl_epd.checkpoint.reader import load_config
from qwen3vl_epd.errors import ImageTooLargeError, InvalidInputError, PromptTooLongError, TooManyImagesError
from qwen3vl_epd.prompt.encoded import CachedImage, ImageLookup
from qwen3vl_epd.prompt.images import decode_raw, image_data
from qwen3vl_epd.prompt.layout import VIDEO_PLACEHOLDER, VISION_PLACEHOLDER, Layout, expand_videos
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.patches import ImagePatches
from qwen3vl_epd.prompt.processed import ProcessedPrompt
from qwen3vl_epd.prompt.video_processing import ProcessedVideo, VideoOptions, VideoProcessor
from qwen3vl_epd.prompt.videos import video_data

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
_MARKERS = re.compile("(<image>|<video>)")
__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "VISION_PLACEHOLDER", "VIDEO_PLACEHOLDER", "Processor"]


class Processor:
    """Turns a user message (text plus raw image and video bytes) into a ProcessedPrompt."""

    def __init__(self, checkpoint_dir: str | Path, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.config = load_config(checkpoint_dir)
        self.architecture = architecture(self.config, checkpoint_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
        pp = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
        pp.pop("image_processor_type", None)
        self.image_processor = Qwen2VLImageProcessorPil(**pp)
        self.video_processor = VideoProcessor(checkpoint_dir)
        # Everything that shapes an image's patches besides its bytes: part of its cache key.
        self.fingerprint = hashlib.sha256(json.dumps(pp, sort_keys=True).encode()).digest()
        self.merge_size = self.image_processor.merge_size
        self.patches = ImagePatches.of(self.image_processor)
        self.layout = Layout(self.config, self.architecture)
        self.on_progress = lambda: None  # called per decoded video frame (the encoder's liveness)

    def build_prompt(self, text: str, num_images: int, raw_prompt: bool = False, num_videos: int = 0) -> str:
        """The templated prompt: `<image>` / `<video>` markers, or leading images and videos, become
        vision placeholders."""
        if raw_prompt:
            for placeholder, sent, kind in ((VISION_PLACEHOLDER, num_images, "images"),
                                            (VIDEO_PLACEHOLDER, num_videos, "videos")):
                if text.count(placeholder) != sent:
                    raise InvalidInputError(f"text_input: raw prompt has {text.count(placeholder)} '{placeholder}' "
                                            f"placeholders but {sent} {kind} were sent")
            return text
        markers = text.count(IMAGE_MARKER), text.count(VIDEO_MARKER)
        for marker, found, sent, kind in zip((IMAGE_MARKER, VIDEO_MARKER), markers, (num_images, num_videos),
                                             ("images", "videos")):
            if any(markers) and found != sent:
                raise InvalidInputError(f"text_input: {found} '{marker}' markers but {sent} {kind} were sent; "
                                        "they must match")
        if any(markers):
            content = [{"type": part[1:-1]} if part in (IMAGE_MARKER, VIDEO_MARKER) else {"type": "text", "text": part}
                       for part in _MARKERS.split(text) if part]
        else:
            content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
            content.append({"type": "text", "text": text})
        return self.apply_chat_template([{"role": "user", "content": content}])

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The checkpoint's chat template with the generation prompt (and `tools`), untokenized."""
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)

    def image_key(self, data: bytes) -> bytes:
        """Full SHA-256 of an image's raw bytes and the processor settings: its encoder cache key."""
        return hashlib.sha256(self.fingerprint + data).digest()

    def process(self, text: str, images: list[bytes] = (), raw_prompt: bool = False,
                cache: ImageLookup | None = None, videos: list[bytes] = (),
                video_options: VideoOptions = VideoOptions()) -> ProcessedPrompt:
        """The semantics of `text_input` + `image` + `video` + `raw_prompt` (README: Interface); an
        image or clip found in `cache` is neither decoded nor cut into patches."""
        lim = self.limits
        if len(images) > lim.max_images:
            raise TooManyImagesError(f"image: {len(images)} images is over the limit of {lim.max_images} per prompt")
        if len(videos) > lim.max_videos:
            raise InvalidInputError(f"video: {len(videos)} videos is over the limit of {lim.max_videos} per prompt "
                                    "(max_videos)")
        options = video_options.check(lim)
        prompt = self.build_prompt(text, len(images), raw_prompt, len(videos))
        data = [image_data(d, i, lim) for i, d in enumerate(images)]
        keys = [self.image_key(d) for d in data]
        found = [cache.get(k) if cache is not None else None for k in keys]
        decoded = [c or decode_raw(d, i, lim) for i, (d, c) in enumerate(zip(data, found))]
        clips = [video_data(d, i, lim) for i, d in enumerate(videos)]
        video_keys = [self.video_processor.key(d, options) for d in clips]
        hits = [cache.get(k) if cache is not None else None for k in video_keys]
        return self.process_prompt(prompt, decoded, keys, self._videos(clips, hits, decoded, options), video_keys)

    def _videos(self, clips: list[bytes], hits: list, images: list, options: VideoOptions) -> list:
        """Each clip's CachedImage, else its ProcessedVideo, within what the images leave of the token limit."""
        if not clips:
            return []
        lim = self.limits
        left = min(lim.max_visual_tokens, lim.max_prompt_tokens)
        left -= sum(int(i.grid_thw.prod()) if isinstance(i, CachedImage) else self._image_tokens(i) for i in images
                    ) // self.merge_size**2
        out = []
        for i, (data, hit) in enumerate(zip(clips, hits)):
            video = hit or self.video_processor.process(data, i, options, lim, left, self.on_progress)
            left -= int(video.grid_thw.prod()) // self.merge_size**2
            out.append(video)
        return out

    def process_prompt(self, prompt: str, images: list, keys: list[bytes] = (), videos: list = (),
                       video_keys: list[bytes] = ()) -> ProcessedPrompt:
        """A templated prompt with one placeholder per image and video (decoded or processed, or a
        CachedImage) → ProcessedPrompt; patches only for those not cached."""
        pixel_values = [torch.zeros(0, self._patch_dim(), dtype=torch.float32)]
        grids, sizes = [torch.zeros(0, 3, dtype=torch.int64)], []
        for i, image in enumerate(images):
            if isinstance(image, CachedImage):
                grids.append(image.grid_thw[None])
            else:
                pv, grid = self._patch(image, i)
                pixel_values.append(pv)
                grids.append(grid)
            sizes.append(image.size)
        video_pixels = [torch.zeros(0, self._patch_dim(), dtype=torch.float32)]
        video_pixels += [v.pixel_values for v in videos if isinstance(v, ProcessedVideo)]
        video_grids = torch.stack([v.grid_thw for v in videos]) if videos else torch.zeros(0, 3, dtype=torch.int64)
        prompt = expand_videos(prompt, [list(v.timestamps) for v in videos])
        grid_thw = torch.cat(grids)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        fill_ids, spans, order = self.layout.expand(ids, grid_thw, video_grids)
        visual = sum(n for _, n in spans)
        if visual > self.limits.max_visual_tokens:
            raise InvalidInputError(f"image, video: {visual} visual tokens is over the limit of "
                                    f"{self.limits.max_visual_tokens} per prompt (max_visual_tokens)")
        if fill_ids.numel() > self.limits.max_prompt_tokens:
            raise PromptTooLongError(
                f"text_input: prompt is {fill_ids.numel()} tokens after image and video expansion, over the "
                f"max model length of {self.limits.max_prompt_tokens}"
            )
        positions, delta = self.layout.rope_index(fill_ids, grid_thw, video_grids)
        return ProcessedPrompt(
            fill_ids=fill_ids, pixel_values=torch.cat(pixel_values), image_grid_thw=grid_thw,
            mrope_positions=positions, mrope_delta=delta, visual_spans=spans, image_sizes=sizes,
            image_keys=list(keys), cached=[image if isinstance(image, CachedImage) else None for image in images],
            pixel_values_videos=torch.cat(video_pixels), video_grid_thw=video_grids, video_keys=list(video_keys),
            video_cached=[v if isinstance(v, CachedImage) else None for v in videos],
            video_sizes=[v.size for v in videos], video_timestamps=[list(v.timestamps) for v in videos],
            visual_order=order,
        )

    def _patch_dim(self) -> int:
        ip = self.image_processor
        return 3 * ip.temporal_patch_size * ip.patch_size * ip.patch_size

    def _image_tokens(self, image: Image.Image) -> int:
        """Patches an image will have (its visual tokens times merge_size squared)."""
        try:
            return self.image_processor.get_number_of_image_patches(image.size[1], image.size[0], {})
        except ValueError:
            return 0  # its aspect ratio is refused by _patch, with the message

    def _patch(self, image: Image.Image, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's patches [n, C*T*P*P] float32 and grid [1, 3]."""
        try:
            if self.patches is not None and image.mode == "RGB":
                return self.patches(image)
            out = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as e:  # smart_resize: aspect ratio over 200
            raise ImageTooLargeError(
                index, f"{image.size[0]}x{image.size[1]} is rejected by the image processor's aspect ratio "
                f"limit (200): {e}"
            ) from None
        return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.int64)
