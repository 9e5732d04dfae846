"""Exactness across peers: greedy answers of our server, of vLLM's CPU build and of transformers
are equal, text, one image and two images, on both bench checkpoints (bench/peer.py's). Runs
where bench/peer.py has set up .venv-vllm (vLLM is 3.5 GB and not part of the test set-up)."""

import sys

import pytest

from support.prompts import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import peer  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not (peer.VENV / "bin" / "vllm").exists(),
                                 reason="PEER TESTS SKIPPED: no .venv-vllm (run bench/peer.py once to set it up)")]


@pytest.mark.parametrize("name", ["tiny", "moderate"])
def test_greedy_answers_equal_vllm_and_transformers(name, tmp_path):
    checkpoint = peer.peer_checkpoint(name)
    want = peer.reference_answers(checkpoint)
    for start in (lambda: peer.Ours(checkpoint, tmp_path / "ours.log"),
                  lambda: peer.Vllm(peer.VENV / "bin" / "vllm", checkpoint, tmp_path / "vllm.log")):
        server = start()
        try:
            got = {k: peer.chat(server.base, checkpoint.name, c) for k, c in peer.CHECKS.items()}
        finally:
            server.stop()
        assert got == want, type(server).__name__
