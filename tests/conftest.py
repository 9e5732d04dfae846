"""Session fixtures (the tiny checkpoint, the transformers reference, both halves in fp32) and the
test tiers: every test carries exactly one tier marker (see pyproject.toml)."""

import os
from pathlib import Path

import pytest
import torch

from support.prompts import ENGINE_CHUNK, ROOT

TIERS = ("unit", "mooncake", "triton", "chaos", "netns")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} has tier markers {tiers}; it needs exactly one of {TIERS}")


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for want of root (network namespaces, the cgroup freezer) are said out loud:
    they are the only proof of the multi-host roles and of recovery from hangs."""
    said = set()
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if " TESTS SKIPPED: " in reason and reason not in said:
            said.add(reason)
            terminalreporter.write_sep("!", reason, red=True, bold=True)


@pytest.fixture(scope="session")
def checkpoint() -> str:
    path = Path(os.environ.get("EPD_TINY_CHECKPOINT", ROOT / "checkpoints" / "tiny"))
    if not (path / "model.safetensors").exists():
        from qwen3vl_epd.checkpoint.tiny import build_tiny

        build_tiny(path)
    return str(path)


@pytest.fixture(scope="session")
def reference(checkpoint):
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def processor(checkpoint):
    from qwen3vl_epd.prompt.processor import Processor

    return Processor(checkpoint)


@pytest.fixture(scope="session")
def encoder(checkpoint):
    from qwen3vl_epd.encoder.vision import VisionEncoder

    return VisionEncoder(checkpoint)


@pytest.fixture(scope="session")
def language(checkpoint):
    from qwen3vl_epd.language.model import LanguageModel

    return LanguageModel(checkpoint)


@pytest.fixture(scope="module")
def peer(checkpoint):
    """An encoder peer process (real Mooncake engine) staging real prompts, for the engine tests."""
    from support.peers import EncoderPeer

    p = EncoderPeer(hidden=64, deepstack=3, checkpoint=checkpoint,
                    buffer_config=dict(num_token_blocks=2048, num_visual_blocks=1024, num_slots=128))
    yield p
    p.close()


@pytest.fixture(scope="module")
def puller():
    """The language side's Puller for the engine tests: small local pools, chunks of ENGINE_CHUNK."""
    from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
    from qwen3vl_epd.transfer.puller import Puller
    from qwen3vl_epd.transfer.signing import HandleKeys
    from qwen3vl_epd.transfer.transport import MooncakeTransport
    from support.peers import TEST_KEY

    cfg = BufferConfig(block_tokens=16, block_visual=16, num_token_blocks=64, num_visual_blocks=64, num_slots=256)
    p = Puller(MultimodalDataBuffers(64, 3, torch.float32, cfg), MooncakeTransport(), HandleKeys(TEST_KEY),
               chunk_tokens=ENGINE_CHUNK)
    yield p
    p.close()
