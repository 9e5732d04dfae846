"""The greedy head (language/greedy_head.py): a bfloat16 screen, then float32 on the candidates,
picks the float32 product's first maximum, where bfloat16 alone would not."""

from types import SimpleNamespace

import pytest
import torch

from qwen3vl_epd.language.engine.model_runner import ModelRunner
from qwen3vl_epd.language.greedy_head import BLOCK, GreedyHead
from qwen3vl_epd.language.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.unit

VOCAB = 40 * BLOCK + 17  # a short last block


def _head(hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, hidden, generator=torch.Generator().manual_seed(seed)) * 0.25


@pytest.mark.parametrize("hidden", [64, 768])
def test_it_picks_the_float32_maximum_of_random_rows(hidden):
    weight = _head(hidden)
    head = GreedyHead(weight)
    with torch.inference_mode():
        for scale in (1e-3, 1.0, 40.0):
            x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(hidden)) * scale
            assert torch.equal(head(x), (x @ weight.T).argmax(-1))
        x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(hidden)) * 1e-36
        tokens = head(x)  # bfloat16 subnormals, which AMX reads as zero: the right tokens, or none
        assert tokens is None or torch.equal(tokens, (x @ weight.T).argmax(-1))
        assert head(torch.zeros(0, hidden)).tolist() == []  # a step whose chunks are all mid-prompt


def test_it_tells_apart_logits_that_bfloat16_rounds_together():
    """Two tokens whose logits differ by less than bfloat16 resolves; the later one is larger."""
    weight = _head(64)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    weight[3] = x[0] * 0.5  # far above every random row
    weight[VOCAB - 2] = weight[3] * (1 + 2**-12)  # in the last, short block
    head = GreedyHead(weight)
    screen = x.bfloat16() @ weight.bfloat16().T
    assert screen[0, 3] == screen[0, VOCAB - 2]  # the screen alone sees a tie and would answer 3
    assert head(x).tolist() == [VOCAB - 2]


def test_equal_logits_give_the_first_token_as_argmax_does():
    weight = _head(64)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    for row, (first, second) in enumerate([(5 * BLOCK + 3, 30 * BLOCK), (BLOCK - 1, BLOCK)]):
        weight[first] = weight[second] = x[row] * 0.5
    assert GreedyHead(weight)(x).tolist() == [5 * BLOCK + 3, BLOCK - 1]


def test_rows_it_cannot_screen_are_left_to_the_whole_product():
    """A zero hidden state ties every token; NaN has no maximum to keep: None, the caller's full lm_head."""
    head = GreedyHead(_head(64))
    assert head(torch.zeros(2, 64)) is None
    assert head(torch.full((1, 64), float("nan"))) is None


def test_the_runner_samples_plain_greedy_rows_through_it_and_the_rest_through_the_logits(language):
    """Same tokens both ways; a row asking for log-probabilities takes the whole product."""
    runner, original, calls = ModelRunner(language), language.greedy_head, []
    head = GreedyHead(language.lm_head.weight)

    def counted(hidden):
        calls.append(hidden.shape[0])
        return head(hidden)

    language.greedy_head = counted
    try:
        hidden = torch.randn(4, language.hidden_size, generator=torch.Generator().manual_seed(3))
        expected = language.lm_head(hidden).argmax(-1).tolist()
        for logprobs, used in ((None, [4]), (2, [])):
            params = [SamplingParams(logprobs=logprobs)] + [SamplingParams()] * 3
            seqs = [SimpleNamespace(params=p, sampler=Sampler(p), grammar=None) for p in params]
            calls.clear()
            tokens, _ = runner.sample(seqs, hidden)
            assert tokens == expected and calls == used
    finally:
        language.greedy_head = original
