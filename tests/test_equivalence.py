"""The encoder and language halves together reproduce transformers' full model exactly (fp32)."""

import pytest
import torch
from reference import reference_greedy, reference_logits

from qwen3vl_epd.encoder.vision import LinearPatchEmbed
from qwen3vl_epd.language.sampling import SamplingParams
from support.prompts import IMAGE_TOKEN_ID, TOL, prompt_inputs

pytestmark = pytest.mark.unit

# text only, one image, two images of different sizes, an image in the middle of the text
CASES = ["lighthouse", "landscape", "two_unmarked", "exif_mid_text"]


@pytest.fixture(scope="module")
def prompts(processor):
    return {k: processor.process(*prompt_inputs(k)) for k in CASES}


@pytest.fixture(scope="module")
def references(reference, prompts):
    return {k: (reference_logits(reference, p), reference_greedy(reference, p, 32)) for k, p in prompts.items()}


@pytest.mark.parametrize("case", CASES)
def test_halves_match_transformers(case, prompts, references, encoder, language):
    prompt = prompts[case]
    ref_logits, ref_tokens = references[case]
    encoded = encoder.encode([prompt])[0]
    assert encoded.num_visual == int((prompt.fill_ids == IMAGE_TOKEN_ID).sum())
    out = language.generate(encoded, SamplingParams(max_tokens=32), return_logits=True)
    diff = (out.prompt_logits - ref_logits).abs().max().item()
    print(f"{case}: L={encoded.length} V={encoded.num_visual} max|dlogit|={diff:.3g}")
    assert diff <= TOL
    assert out.tokens == ref_tokens


@pytest.mark.parametrize("case", ["landscape", "two_unmarked", "exif_mid_text"])
def test_chunked_prefill_matches(case, prompts, references, encoder, language):
    """Prefill in chunks that cut through images: every chunk must carry its own DeepStack rows."""
    ref_logits, ref_tokens = references[case]
    encoded = encoder.encode([prompts[case]])[0]
    chunk = max(8, encoded.length // 4)
    out = language.generate(encoded, SamplingParams(max_tokens=32), chunk_size=chunk, return_logits=True)
    assert (out.prompt_logits - ref_logits).abs().max().item() <= TOL
    assert out.tokens == ref_tokens


def test_packed_batch_equals_one_by_one(prompts, encoder):
    """One vision forward over several prompts gives each prompt exactly its own rows."""
    order = ["two_unmarked", "lighthouse", "landscape", "exif_mid_text"]
    batched = encoder.encode([prompts[k] for k in order])
    for key, b in zip(order, batched):
        alone = encoder.encode([prompts[key]])[0]
        assert b.embeddings.shape == alone.embeddings.shape
        assert b.deepstack.shape == (alone.num_visual, 3 * 64)
        # a batch's products round differently from one prompt's (relative 1e-5); a wrong row is off by O(1)
        torch.testing.assert_close(b.embeddings, alone.embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.deepstack, alone.deepstack, atol=1e-5, rtol=1e-5)
        assert torch.equal(b.fill_ids, alone.fill_ids) and torch.equal(b.mrope_positions, alone.mrope_positions)


def test_dropping_deepstack_breaks_equivalence(prompts, references, encoder, language):
    """Control: the comparison is sharp enough to see a missing DeepStack."""
    encoded = encoder.encode([prompts["landscape"]])[0]
    encoded.deepstack = torch.zeros_like(encoded.deepstack)
    out = language.generate(encoded, SamplingParams(max_tokens=1), return_logits=True)
    assert (out.prompt_logits - references["landscape"][0]).abs().max().item() > 100 * TOL


def test_dropping_deepstack_after_first_chunk_breaks_equivalence(prompts, references, encoder, language):
    """Control for the seed's bug: DeepStack only in the first chunk must be caught."""
    encoded = encoder.encode([prompts["landscape"]])[0]
    first_image_token = encoded.visual_spans[0][0]
    chunk = first_image_token + 16  # the first chunk holds only part of the image
    keep = encoded.visual_rows_before(chunk)
    encoded.deepstack = encoded.deepstack.clone()
    encoded.deepstack[keep:] = 0
    out = language.generate(encoded, SamplingParams(max_tokens=1), chunk_size=chunk, return_logits=True)
    assert (out.prompt_logits - references["landscape"][0]).abs().max().item() > 100 * TOL


def test_seeded_sampling_is_reproducible(prompts, encoder, language):
    encoded = encoder.encode([prompts["landscape"]])[0]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    a = language.generate(encoded, params).tokens
    b = language.generate(encoded, params).tokens
    c = language.generate(encoded, SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=4321)).tokens
    assert a == b
    assert a != c


def test_patch_embedding_as_one_product_equals_the_convolution(prompts, encoder):
    """LinearPatchEmbed against the checkpoint's own Conv3d, on the patches of a real image: equal
    up to float32 summation order over 1536 products (the full model's equality is asserted above)."""
    embed, pixels = encoder.visual.patch_embed, prompts["landscape"].pixel_values
    assert isinstance(embed, LinearPatchEmbed)
    conv = embed.proj(pixels.view(-1, embed.proj.in_channels, *embed.proj.kernel_size)).flatten(1)
    torch.testing.assert_close(embed(pixels), conv, atol=5e-5, rtol=1e-5)
