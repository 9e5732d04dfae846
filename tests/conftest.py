"""Session fixtures (the tiny checkpoint, the transformers reference, both halves in fp32) and the
test tiers: every test carries exactly one tier marker (see pyproject.toml)."""

import os
from pathlib import Path

import pytest
import torch
from fixtures import ROOT

TIERS = ("unit", "mooncake", "triton", "chaos", "netns")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} has tier markers {tiers}; it needs exactly one of {TIERS}")


def pytest_terminal_summary(terminalreporter):
    """Skipped namespace tests are said out loud: they are the only proof of the multi-host roles."""
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "NETWORK NAMESPACE TESTS SKIPPED" in reason:
            terminalreporter.write_sep("!", reason.removeprefix("Skipped: "), red=True, bold=True)
            return


@pytest.fixture(scope="session")
def checkpoint() -> str:
    path = Path(os.environ.get("EPD_TINY_CHECKPOINT", ROOT / "checkpoints" / "tiny"))
    if not (path / "model.safetensors").exists():
        from qwen3vl_epd.tiny_checkpoint import build_tiny

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
