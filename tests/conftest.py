"""Shared fixtures: the tiny checkpoint, the transformers reference, and both halves (fp32)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path(os.environ.get("EPD_TEST_IMAGES", ROOT.parent / "shared" / "testdata" / "images"))
TOL = 1e-4  # fp32 max abs logit difference against transformers


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


@pytest.fixture(scope="session")
def checkpoint() -> str:
    path = Path(os.environ.get("EPD_TINY_CHECKPOINT", ROOT / "checkpoints" / "tiny"))
    if not (path / "model.safetensors").exists():
        from qwen3vl_epd.checkpoint import build_tiny

        build_tiny(path)
    return str(path)


@pytest.fixture(scope="session")
def reference(checkpoint):
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def processor(checkpoint):
    from qwen3vl_epd.processor import Processor

    return Processor(checkpoint)


@pytest.fixture(scope="session")
def encoder(checkpoint):
    from qwen3vl_epd.encoder import VisionEncoder

    return VisionEncoder(checkpoint)


@pytest.fixture(scope="session")
def language(checkpoint):
    from qwen3vl_epd.language import LanguageModel

    return LanguageModel(checkpoint)
