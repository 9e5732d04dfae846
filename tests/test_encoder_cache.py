"""Encoder cache: a repeated image is encoded once and gives the rows a fresh encode gives; no
false hits; least recently used out first."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_epd.encoder.cache import EncoderCache
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.processor import Processor
from support.prompts import TOL, image_bytes

pytestmark = pytest.mark.unit

X, Y = image_bytes("landscape_640x480.jpg"), image_bytes("small_64x64.webp")


def noise_png(seed: int, side: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def encode(processor, encoder, cache, *prompts):
    """(text, images) prompts → their EncodedPrompts, through `cache`."""
    return encoder.encode([processor.process(t, list(i), cache=cache) for t, i in prompts], cache)


def assert_same(a, b):
    assert torch.equal(a.fill_ids, b.fill_ids) and torch.equal(a.mrope_positions, b.mrope_positions)
    assert a.mrope_delta == b.mrope_delta and a.visual_spans == b.visual_spans
    assert (a.embeddings - b.embeddings).abs().max() <= TOL and (a.deepstack - b.deepstack).abs().max() <= TOL


def test_a_repeated_image_is_encoded_once_and_equals_a_fresh_encode(processor, encoder):
    cache = EncoderCache(1 << 30)
    first = encoder.images_encoded
    encode(processor, encoder, cache, ("Describe <image>.", [X]))
    [mixed] = encode(processor, encoder, cache, ("Compare <image> with <image>.", [Y, X]))
    assert encoder.images_encoded - first == 2  # X once, then only Y
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    [fresh] = encode(processor, encoder, None, ("Compare <image> with <image>.", [Y, X]))
    assert_same(mixed, fresh)
    # the same image twice in one batch, uncached: one forward for it
    before = encoder.images_encoded
    a, b = encode(processor, encoder, EncoderCache(1 << 30), ("<image>", [Y]), ("Again <image> <image>", [Y, Y]))
    assert encoder.images_encoded - before == 1
    assert torch.equal(b.embeddings[: a.num_visual], a.embeddings)


def test_different_images_of_one_size_never_share_rows(processor, encoder):
    cache = EncoderCache(1 << 30)
    p, q = noise_png(1), noise_png(2)
    [a] = encode(processor, encoder, cache, ("<image>", [p]))
    [b] = encode(processor, encoder, cache, ("<image>", [q]))
    assert cache.hits == 0 and a.embeddings.shape == b.embeddings.shape
    assert not torch.equal(a.embeddings, b.embeddings)


def test_keys_cover_bytes_and_processor_settings(processor, encoder, checkpoint):
    cache = EncoderCache(1 << 30)
    encode(processor, encoder, cache, ("<image>", [Y]))
    url = b"data:image/webp;base64," + base64.b64encode(Y)  # the same bytes, as a JSON client sends them
    p = processor.process("<image>", [url], cache=cache)
    assert p.cached[0] is not None and cache.hits == 1 and p.pixel_values.shape[0] == 0
    assert len(processor.image_key(Y)) == 32 and processor.image_key(Y) != processor.image_key(Y + b"\0")
    other = Processor(checkpoint, Limits())
    other.fingerprint = b"another max_pixels"
    assert other.image_key(Y) != processor.image_key(Y)


def test_least_recently_used_goes_first(processor, encoder):
    images = [noise_png(s) for s in range(3)]
    [one] = encode(processor, encoder, None, ("<image>", [images[0]]))
    per_image = one.embeddings.nbytes + one.deepstack.nbytes + 3 * 8
    cache = EncoderCache(2 * per_image)
    for image in (images[0], images[1], images[0], images[2]):  # the second look at 0 makes 1 the oldest
        encode(processor, encoder, cache, ("<image>", [image]))
    assert len(cache) == 2 and cache.bytes == 2 * per_image
    keys = [processor.image_key(i) for i in images]
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    # after eviction a re-encoded image equals its first encode
    [again] = encode(processor, encoder, cache, ("<image>", [images[0]]))
    assert_same(again, one)
