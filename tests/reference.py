"""transformers' own Qwen3VLMoeForConditionalGeneration on a ProcessedPrompt: the ground truth."""

import torch


def token_types(ids: torch.Tensor, image_token_id=151655, video_token_id=151656) -> torch.Tensor:
    """mm_token_type_ids: 1 at image pads, 2 at video pads."""
    return ((ids == image_token_id).int() + 2 * (ids == video_token_id).int())


def reference_inputs(prompt, image_token_id=151655) -> dict:
    ids = prompt.fill_ids[None].long()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=token_types(ids, image_token_id))
    if prompt.num_images:
        kw.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    if getattr(prompt, "num_videos", 0):
        kw.update(pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw)
    return kw


@torch.no_grad()
def reference_logits(model, prompt) -> torch.Tensor:
    """Prompt logits [L, vocab]."""
    return model(**reference_inputs(prompt)).logits[0]


@torch.no_grad()
def reference_greedy(model, prompt, max_new_tokens: int = 32) -> list[int]:
    """transformers' greedy generate, new tokens only."""
    kw = reference_inputs(prompt)
    out = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, kw["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def reference_logprobs(model, prompt, tokens: list[int], image_token_id=151655) -> torch.Tensor:
    """log-softmax of transformers' logits at each generated position, [len(tokens), vocab]: the
    prompt and the tokens in one forward."""
    kw = reference_inputs(prompt, image_token_id)
    ids = torch.cat([kw["input_ids"], torch.tensor([tokens])], 1)
    kw.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=token_types(ids, image_token_id))
    logits = model(**kw).logits[0, prompt.fill_ids.numel() - 1 : -1]
    return torch.log_softmax(logits.float(), -1)
