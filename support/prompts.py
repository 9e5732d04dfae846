"""Helpers the test modules share: paths, the tolerance, the one prompt table, the image outcomes."""

import os
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path(os.environ.get("EPD_TEST_IMAGES", ROOT.parent / "shared" / "testdata" / "images"))
TOL = 1e-4  # fp32 max abs logit difference against transformers
ENGINE_CHUNK = 64  # prompt tokens per pulled chunk in the engine tests (long prompts span several)
IMAGE_TOKEN_ID = 151655

# Every prompt the tests send: name → (user message, image files). A test picks names from here.
PROMPTS = {
    "hi": ("Hi!", []),
    "dragon": ("Write a long story about a dragon who learns to paint with watercolors.", []),
    "lighthouse": ("Tell me a story about a lighthouse.", []),
    "haiku": ("Write a haiku about rain.", []),
    "sea": ("Tell me about the sea.", []),
    "small_image": ("Describe this image.", ["small_64x64.webp"]),
    "landscape": ("Describe this image.", ["landscape_640x480.jpg"]),
    "landscape_in_detail": ("Describe it in detail.", ["landscape_640x480.jpg"]),
    "two_marked": ("Compare <image> and <image>.", ["portrait_300x500.png", "small_64x64.webp"]),
    "two_marked_with": ("Compare <image> with <image>.", ["portrait_300x500.png", "small_64x64.webp"]),
    "two_unmarked": ("Compare these two pictures.", ["portrait_300x500.png", "small_64x64.webp"]),
    "two_differ": ("What differs between <image> and <image>?", ["portrait_300x500.png", "cmyk.jpg"]),
    "cmyk_mid_text": ("Look at <image> and name one color.", ["cmyk.jpg"]),
    "exif_mid_text": ("Here is a photo <image> and what do you see in it?", ["exif_rotated.jpg"]),
}

# The outcome each test image must get (../shared/testdata/images/README.md).
ACCEPTED = [
    "landscape_640x480.jpg", "portrait_300x500.png", "small_64x64.webp", "rgba_translucent.png",
    "grayscale.png", "palette.png", "cmyk.jpg", "gray16.png", "exif_rotated.jpg", "one_pixel.png",
    "animated.webp",
]
REJECTED = {  # name → what the error message must say
    "extreme_aspect_4000x10.png": "aspect ratio limit (200)",
    "truncated.jpg": "cannot decode image",
    "not_an_image.jpg": "cannot decode image",
    "empty.png": "cannot decode image",
    "bomb_40000x40000.png": "over the pixel limit of 50000000",
}


def noise_jpeg(side: int, seed: int = 0) -> bytes:
    """A side×side JPEG of noise: a large image that is slow to encode (2048: seconds on the tiny tower)."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def prompt_inputs(name: str) -> tuple[str, list[bytes]]:
    """(text, image bytes) of a prompt of the table."""
    text, images = PROMPTS[name]
    return text, [image_bytes(i) for i in images]


class Collector:
    """Gathers one engine request's pieces and when each came; `done` is set by its last piece."""

    def __init__(self, params=None, probe=False):
        from qwen3vl_epd.language.request import LanguageRequest

        self.pieces, self.times, self.done = [], [], threading.Event()
        self.request = LanguageRequest(params, self.emit, probe=probe)

    def emit(self, piece):
        self.pieces.append(piece)
        self.times.append(time.monotonic())
        if piece.finish_reason or piece.error:
            self.done.set()

    @property
    def text(self):
        return "".join(p.text for p in self.pieces)

    @property
    def last(self):
        return self.pieces[-1]


def language_request_inputs(handle: bytes) -> list:
    """gRPC inputs of a long stream sent straight to the decoupled language model (ensembles, in
    tritonserver 2.51, pass a cancellation on only between steps, so a running last step never sees it)."""
    from qwen3vl_epd.wire import bytes_input, request_inputs

    return [bytes_input("handle", [handle]), *request_inputs(None, [], True, {"max_tokens": 4000, "ignore_eos": True})]


def ask_with_image(server, endpoint: str, image: bytes, max_tokens: int = 4, model: str = "tiny") -> int:
    """One image request through `grpc` (the language model) or `openai` (the OpenAI server, whose
    model name is the checkpoint directory's): its output tokens (ignore_eos: exactly max_tokens)."""
    from client import data_url, generate, text_of

    if endpoint == "grpc":
        return text_of(generate(server.grpc_url, "Describe this image.", [image], max_tokens=max_tokens,
                                ignore_eos=True, timeout=600))[1].num_output_tokens
    from openai import OpenAI

    client = OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=600)
    reply = client.chat.completions.create(model=model, max_tokens=max_tokens, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": [
                                               {"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "Describe this image."}]}])
    return reply.usage.completion_tokens


def run_local(engine, asks: list[tuple], timeout: float = 180) -> list[Collector]:
    """Submit each (EncodedPrompt, SamplingParams) to the engine as a local prompt, all before the
    first finishes; their collectors once every one has ended without an error."""
    from qwen3vl_epd.prompt.source import LocalPrompt

    collectors = []
    for prompt, params in asks:
        c = Collector(params)
        engine.submit(LocalPrompt(prompt, ENGINE_CHUNK), c.request)
        collectors.append(c)
    for c in collectors:
        assert c.done.wait(timeout), "request did not finish"
        assert c.last.error is None, c.last.error
    return collectors
