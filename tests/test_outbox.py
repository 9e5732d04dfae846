"""The language model's way out, without Triton: Triton's is_cancelled never runs once a request's
final response is on its way (tritonserver frees the request then; asking it segfaulted the server)."""

import pytest

from qwen3vl_epd.language.request import Piece
from qwen3vl_epd.triton_backend.outbox import Outbox, Reply

pytestmark = pytest.mark.unit


def test_is_cancelled_never_runs_after_the_final_response():
    calls, sent = [], []
    reply = Reply(object(), is_cancelled=lambda: calls.append(1) or False)
    assert reply.cancelled() is False and calls == [1]
    box = Outbox(send=lambda sender, piece: sent.append((reply.closed, piece.finish_reason)), cancel=lambda r: None)
    box.put(reply, Piece("a", None, 1, 1))
    box.put(reply, Piece("b", "stop", 1, 2))
    box.close()
    box._thread.join(5)
    assert sent[-1] == (True, "stop")  # closed before the final send
    assert reply.cancelled() is False and calls == [1]  # and never asked again
