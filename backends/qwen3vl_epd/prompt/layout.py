"""Where visual tokens go in a prompt: a video's per-frame layout, pad expansion, and M-RoPE by
transformers' own get_rope_index."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwen3vl_epd.errors import InvalidInputError

VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids


def video_frames_text(timestamps: list[float]) -> str:
    """A clip's place in the prompt: `<t seconds>` and one pad run per temporal patch. This is the
    layout of Qwen's own Qwen3-VL processor and of vLLM: the template's outer vision_start/end is
    replaced, not kept around the frames as transformers 5.24 does (vLLM issue #46817)."""
    return "".join(f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>" for t in timestamps)


def expand_videos(prompt: str, timestamps: list[list[float]]) -> str:
    """Each video placeholder of a templated prompt replaced by its clip's frame layout."""
    parts = prompt.split(VIDEO_PLACEHOLDER)
    if len(parts) - 1 != len(timestamps):
        raise InvalidInputError(f"text_input: {len(parts) - 1} video placeholders in the prompt but "
                                f"{len(timestamps)} videos")
    return parts[0] + "".join(video_frames_text(t) + rest for t, rest in zip(timestamps, parts[1:]))


class Layout:
    """Token ids and grids → expanded ids, spans, the visual items' order, M-RoPE positions."""

    def __init__(self, config, architecture):
        self.merge_unit = config.vision_config.spatial_merge_size**2
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        # get_rope_index only needs the config and get_vision_position_ids (which ignores self);
        # this lets us call transformers' own M-RoPE code without building the model.
        self._rope_owner = SimpleNamespace(
            config=config,
            get_vision_position_ids=lambda *a, **k: architecture.model.get_vision_position_ids(None, *a, **k),
        )
        self._get_rope_index = architecture.model.get_rope_index

    def expand(self, ids: list[int], image_grids: torch.Tensor, video_grids: torch.Tensor):
        """One pad per image and per video frame → (fill ids, spans, order): a span (first token,
        count) per image and per frame, and ("image" | "video", index) per item in prompt order."""
        per_image = (image_grids.prod(-1) // self.merge_unit).tolist()
        frames = [(int(t), int(h * w) // self.merge_unit) for t, h, w in video_grids.tolist()]
        found = ids.count(self.image_token_id), ids.count(self.video_token_id)
        if found != (len(per_image), sum(t for t, _ in frames)):
            raise InvalidInputError(f"text_input: {found[0]} image and {found[1]} video frame placeholders in the "
                                    f"prompt but {len(per_image)} images and {len(frames)} videos")
        out, spans, order = [], [], []
        images = videos = frames_left = 0  # frames_left: of the video being laid out
        for t in ids:
            if t == self.image_token_id:
                n, images = per_image[images], images + 1
                order.append(("image", images - 1))
            elif t == self.video_token_id:
                if frames_left == 0:
                    order.append(("video", videos))
                    frames_left, videos = frames[videos][0], videos + 1
                n, frames_left = frames[videos - 1][1], frames_left - 1
            else:
                out.append(t)
                continue
            spans.append((len(out), n))
            out.extend([t] * n)
        return torch.tensor(out, dtype=torch.int64), spans, order

    def rope_index(self, fill_ids: torch.Tensor, image_grids: torch.Tensor,
                   video_grids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, L] and delta, by transformers' get_rope_index."""
        if image_grids.shape[0] == 0 and video_grids.shape[0] == 0:
            L = fill_ids.numel()
            return torch.arange(L, dtype=torch.int64).expand(3, L).clone(), 0
        ids = fill_ids[None]
        types = torch.where(ids == self.image_token_id, IMAGE, torch.where(ids == self.video_token_id, VIDEO, TEXT))
        pos, delta = self._get_rope_index(self._rope_owner, ids, types.to(torch.int32), image_grid_thw=image_grids,
                                          video_grid_thw=video_grids if video_grids.shape[0] else None)
        return pos[:, 0].to(torch.int64), int(delta.item())
