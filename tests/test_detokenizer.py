"""Incremental detokenization: pieces add up to the full decode; stop strings cut exactly."""

from qwen3vl_epd.detokenizer import Detokenizer


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
