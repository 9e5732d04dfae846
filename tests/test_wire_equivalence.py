"""Encoder half in one process, Mooncake pull, language half in this one: equal to transformers."""

import pytest
import torch
from reference import reference_greedy, reference_logits

from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.transfer.puller import Puller
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport
from support.peers import TEST_KEY, EncoderPeer
from support.prompts import TOL, prompt_inputs

pytestmark = pytest.mark.mooncake

CASES = ["haiku", "landscape", "two_differ"]  # text only, one image, two images
CHUNK = 96  # two_differ is 225 tokens: three chunks, both images cut across chunk boundaries


@pytest.fixture(scope="module")
def encoder_peer(checkpoint):
    p = EncoderPeer(hidden=64, deepstack=3, checkpoint=checkpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def puller():
    buffers = MultimodalDataBuffers(64, 3, torch.float32, BufferConfig(block_tokens=32, block_visual=32,
                                                                       num_token_blocks=8, num_visual_blocks=8))
    p = Puller(buffers, MooncakeTransport("127.0.0.1", "tcp"), HandleKeys(TEST_KEY), chunk_tokens=CHUNK)
    yield p
    p.close()


@pytest.mark.parametrize("case", CASES)
def test_through_the_wire(case, encoder_peer, puller, processor, reference, language):
    text, images = prompt_inputs(case)
    prompt = processor.process(text, images)
    ref_logits, ref_tokens = reference_logits(reference, prompt), reference_greedy(reference, prompt, 32)
    handle = encoder_peer.call("prompt", text, images)
    with puller.open(handle) as session:
        chunks = []

        def pulled():  # each chunk is read just before it is prefilled
            for chunk in session.chunks():
                chunks.append(chunk)
                yield chunk

        out = language.generate(pulled(), SamplingParams(max_tokens=32), return_logits=True)
    diff = (out.prompt_logits - ref_logits).abs().max().item()
    print(f"{case}: L={prompt.fill_ids.numel()} chunks={len(chunks)} max|dlogit|={diff:.3g}")
    assert diff <= TOL
    assert out.tokens == ref_tokens
    if case == "two_differ":
        assert len(chunks) >= 3 and sum(c.num_visual > 0 for c in chunks) >= 3
    assert all(v == 0 for v in puller.buffers.in_use().values())
    encoder_peer.call("reclaim", 0)
    assert all(v == 0 for v in encoder_peer.in_use().values())
