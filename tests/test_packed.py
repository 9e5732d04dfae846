"""Packed linear layers (language/packed.py): the same products as F.linear, used only where they apply."""

import pytest
import torch

from qwen3vl_epd.language.packed import PackedLinear, packable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_equals_f_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 1000, bias=bias)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in [(1, 96), (4, 96), (16, 96), (3, 7, 96), (200, 96)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed.weight is linear.weight  # the state dict and a tied lm_head keep the plain weight


def test_the_language_model_packs_only_float32_on_cpu(language):
    assert packable(torch.device("cpu"), torch.float32)
    assert not packable(torch.device("cpu"), torch.bfloat16) and not packable(torch.device("meta"), torch.float32)
    assert isinstance(language.lm_head, PackedLinear)
    attention = language.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, n), PackedLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
