"""Incremental detokenization: pieces add up to the full decode; stop strings cut exactly."""

import pytest

from qwen3vl_epd.language.detokenizer import Detokenizer

pytestmark = pytest.mark.unit


def test_pieces_add_up_to_full_decode(processor):
    tok = processor.tokenizer
    ids = tok("Grüße 👋🏽 from 東京, naïve café!", add_special_tokens=False)["input_ids"] + [151645]
    ids += tok.encode("👋")[:1]  # an unfinished multi-byte character at the end
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces[:-1])


def test_stop_strings_are_cut_and_never_sent(processor):
    tok = processor.tokenizer
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, stop=["STOP"])
    sent = ""
    for t in ids:
        sent += d.add(t)
        if d.stopped:
            break
    sent += d.flush()
    assert d.stopped and sent == "alpha beta "


def test_random_token_streams_add_up(processor):
    """Random ids (byte tokens that split characters included) against one full decode."""
    import random

    tok = processor.tokenizer
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(151643) for _ in range(rng.randrange(1, 60))]
        d = Detokenizer(tok)
        assert "".join(d.add(t) for t in ids) + d.flush() == tok.decode(ids, skip_special_tokens=True)


def test_merge_pieces_keeps_order_and_finals():
    from qwen3vl_epd.errors import EpdError
    from qwen3vl_epd.language.request import Piece
    from qwen3vl_epd.triton_backend.outbox import merge_pieces

    a, b = object(), object()
    batch = [(a, Piece("He", None, 5, 1)), (b, Piece("x", None, 3, 1)), (a, Piece("llo", None, 5, 2)),
             (a, Piece("!", "stop", 5, 3)), (b, Piece("", None, 3, 1, EpdError("boom")))]
    out = merge_pieces(batch)
    assert [(s is a, p.text, p.finish_reason, p.num_output_tokens) for s, p in out] == [
        (True, "Hello!", "stop", 3), (False, "x", None, 1), (False, "", None, 1)]
    assert out[2][1].error is not None
