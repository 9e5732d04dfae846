"""Image decoding with limits and prompt processing, over ../shared/testdata/images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_epd.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    PromptTooLongError,
    TooManyImagesError,
)
from qwen3vl_epd.prompt.images import decode_image
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.processor import VISION_PLACEHOLDER, Processor
from support.prompts import ACCEPTED, REJECTED, image_bytes

pytestmark = pytest.mark.unit

ERROR_TYPES = {
    "extreme_aspect_4000x10.png": ImageTooLargeError,
    "truncated.jpg": ImageDecodeError,
    "not_an_image.jpg": ImageDecodeError,
    "empty.png": ImageDecodeError,
    "bomb_40000x40000.png": ImageTooLargeError,
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_images(processor, name):
    p = processor.process("What is this?", [image_bytes(name)])
    assert p.num_images == 1
    v = int(p.image_grid_thw.prod()) // 4
    assert int((p.fill_ids == 151655).sum()) == v and p.visual_spans[0][1] == v
    assert p.pixel_values.shape == (int(p.image_grid_thw.prod()), 3 * 2 * 16 * 16)
    assert p.mrope_positions.shape == (3, p.fill_ids.numel())


def test_conversions_to_rgb():
    limits = Limits()
    assert decode_image(image_bytes("exif_rotated.jpg"), 0, limits).size == (200, 320)
    for name in ("cmyk.jpg", "gray16.png", "palette.png", "rgba_translucent.png", "grayscale.png", "animated.webp"):
        assert decode_image(image_bytes(name), 0, limits).mode == "RGB"
    # 16-bit grayscale is scaled, not clipped to white
    gray = decode_image(image_bytes("gray16.png"), 0, limits)
    assert len(np.unique(np.asarray(gray))) > 2
    frame0 = Image.open(io.BytesIO(image_bytes("animated.webp"))).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(image_bytes("animated.webp"), 0, limits)), np.asarray(frame0))


@pytest.mark.parametrize("name", ACCEPTED)
def test_patches_equal_the_image_processors_own(processor, name):
    """The table-lookup patches (ImagePatches) equal transformers' processor bit for bit."""
    image = decode_image(image_bytes(name), 0, Limits())
    ours, grid = processor._patch(image, 0)
    theirs = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(ours, theirs["pixel_values"].float()) and torch.equal(grid, theirs["image_grid_thw"])


@pytest.mark.parametrize("size", [(640, 480), (77, 100), (1000, 33), (1920, 1080), (1, 1), (3000, 17)])
def test_patches_of_resized_images_equal_the_image_processors_own(processor, size):
    """Sizes the processor resizes (not multiples of 32, or below its minimum) and one it keeps."""
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours, grid = processor.patches(image)
    theirs = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(ours, theirs["pixel_values"].float()) and torch.equal(grid, theirs["image_grid_thw"])


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_images_name_the_index(processor, name):
    err_type, text = ERROR_TYPES[name], REJECTED[name]
    images = [image_bytes("small_64x64.webp"), image_bytes(name)]
    with pytest.raises(err_type) as e:
        processor.process("Two images", images)
    assert e.value.code == "INVALID_ARG"
    assert str(e.value).startswith("image 1:") and text in str(e.value)


def test_bomb_is_rejected_from_the_header(processor, monkeypatch):
    """The 1.6 G-pixel bomb must fail before any pixel is decoded."""
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded pixels of a bomb"))
    with pytest.raises(ImageTooLargeError, match="pixel limit of 50000000"):
        processor.process("x", [image_bytes("bomb_40000x40000.png")])


def test_byte_limit(checkpoint):
    p = Processor(checkpoint, Limits(max_image_bytes=1000))
    data = image_bytes("landscape_640x480.jpg")
    with pytest.raises(ImageTooLargeError, match=f"image 0: {len(data)} bytes is over the limit of 1000 encoded bytes"):
        p.process("x", [data])


def test_pixel_limit_below_pillow_default(checkpoint):
    p = Processor(checkpoint, Limits(max_image_pixels=640 * 480 - 1))
    p.process("x", [image_bytes("portrait_300x500.png")])
    with pytest.raises(ImageTooLargeError, match="640x480 = 307200 pixels is over the pixel limit of 307199"):
        p.process("x", [image_bytes("portrait_300x500.png"), image_bytes("landscape_640x480.jpg")])


def test_too_many_images(checkpoint):
    p = Processor(checkpoint, Limits(max_images=2))
    img = image_bytes("small_64x64.webp")
    assert p.process("x", [img, img]).num_images == 2
    with pytest.raises(TooManyImagesError, match="3 images is over the limit of 2 per prompt"):
        p.process("x", [img, img, img])


def test_prompt_too_long(checkpoint):
    p = Processor(checkpoint, Limits(max_prompt_tokens=100))
    with pytest.raises(PromptTooLongError, match=r"prompt is \d+ tokens .* max model length of 100"):
        p.process("x", [image_bytes("landscape_640x480.jpg")])
    with pytest.raises(PromptTooLongError):
        p.process("word " * 200)


def test_marker_count_must_match(processor):
    img = image_bytes("small_64x64.webp")
    with pytest.raises(InvalidInputError, match="2 '<image>' markers but 1 images"):
        processor.process("<image> and <image>", [img])


def test_images_anywhere_in_the_prompt(processor):
    img1, img2 = image_bytes("small_64x64.webp"), image_bytes("portrait_300x500.png")
    p = processor.process("A <image> then B <image> then C", [img1, img2])
    text = processor.tokenizer.decode(p.fill_ids)
    assert text.index("A ") < text.index("<|vision_start|>") < text.index(" then B")
    (s0, n0), (s1, n1) = p.visual_spans
    assert (n0, n1) == (64, 144) and s0 < s1
    assert processor.tokenizer.decode(p.fill_ids[s0 + n0 : s1]).startswith("<|vision_end|> then B")
    # no marker: images go first, in order
    q = processor.process("Compare.", [img2, img1])
    assert [n for _, n in q.visual_spans] == [144, 64]
    assert processor.tokenizer.decode(q.fill_ids[q.visual_spans[1][0] + 64 :]).startswith("<|vision_end|>Compare.")


def test_raw_prompt(processor):
    img = image_bytes("small_64x64.webp")
    raw = f"<|im_start|>user\n{VISION_PLACEHOLDER}Hi<|im_end|>\n<|im_start|>assistant\n"
    assert torch.equal(processor.process(raw, [img], raw_prompt=True).fill_ids, processor.process("Hi", [img]).fill_ids)
    with pytest.raises(InvalidInputError, match="1 '<|vision_start|>"):
        processor.process(raw, [img, img], raw_prompt=True)


def test_mrope_positions_follow_the_image_grid(processor):
    p = processor.process("Hi <image> there", [image_bytes("portrait_300x500.png")])
    (start, n), = p.visual_spans
    t, h, w = p.image_grid_thw[0].tolist()
    pos = p.mrope_positions[:, start : start + n]
    assert n == t * (h // 2) * (w // 2)
    assert pos[0].unique().tolist() == [start]
    assert pos[1].max() - pos[1].min() == h // 2 - 1 and pos[2].max() - pos[2].min() == w // 2 - 1
    after = p.mrope_positions[:, start + n]
    assert after.tolist() == [start + max(h, w) // 2] * 3
    assert p.mrope_delta == int(p.mrope_positions.max()) + 1 - p.fill_ids.numel()


def test_data_url_images(processor):
    import base64

    raw = image_bytes("small_64x64.webp")
    url = b"data:image/webp;base64," + base64.b64encode(raw)
    assert torch.equal(processor.process("x", [url]).pixel_values, processor.process("x", [raw]).pixel_values)
    with pytest.raises(ImageDecodeError, match="image 0: cannot decode image: invalid base64"):
        processor.process("x", [b"data:image/png;base64,@@@"])
