"""MultimodalDataBuffers and the Mooncake pull, between real engines in separate OS processes."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peers import EncoderPeer, synthetic_prompt

from qwen3vl_epd.block_allocator import blocks_for
from qwen3vl_epd.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.errors import HandleError, HandleExpiredError, PeerError, PoolFullError
from qwen3vl_epd.transfer import Handle, MooncakeTransport, Puller

pytestmark = pytest.mark.mooncake

H = 64
ENC_BUFFERS = dict(block_tokens=16, block_visual=16, num_token_blocks=512, num_visual_blocks=256, num_slots=48)
CHUNK = 64


def zero(d):
    return all(v == 0 for v in d.values())


@pytest.fixture(scope="module", params=[3, 0], ids=["deepstack3", "deepstack0"])
def peer(request):
    p = EncoderPeer(hidden=H, deepstack=request.param, buffer_config=ENC_BUFFERS)
    yield p
    p.close()


@pytest.fixture(scope="module")
def transport():
    return MooncakeTransport("127.0.0.1", "tcp")


def make_puller(transport, deepstack, chunk=CHUNK, **kw):
    # Different block size from the encoder's on purpose: runs must split at both sides' boundaries.
    cfg = BufferConfig(block_tokens=32, block_visual=8, num_token_blocks=8, num_visual_blocks=32, num_slots=40)
    return Puller(MultimodalDataBuffers(H, deepstack, torch.float32, cfg), transport, chunk_tokens=chunk, **kw)


@pytest.fixture(scope="module")
def puller(peer, transport):
    p = make_puller(transport, peer.deepstack)
    yield p
    p.close()


def assert_same(got, want):
    for name in ("fill_ids", "mrope_positions", "embeddings", "deepstack"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert got.mrope_delta == want.mrope_delta
    assert [tuple(s) for s in got.image_spans] == [tuple(s) for s in want.image_spans]


@pytest.mark.parametrize("length,visual,images", [(20, 0, 0), (10, 1, 1), (60, 37, 1), (230, 150, 3)],
                         ids=["V0", "V1", "V37_not_block_multiple", "three_chunks"])
def test_round_trip_bit_exact(peer, puller, length, visual, images):
    d = peer.deepstack
    handle = peer.stage(7, length, visual, images)
    before = puller.stats.bytes_read
    with puller.open(handle) as session:
        assert session.num_chunks == blocks_for(length, CHUNK)
        got = session.read_all()
    assert_same(got, synthetic_prompt(7, length, visual, H, d, images))
    row = 4 + 12
    expected = length * row + visual * H * 4 * (1 + d) + 2 * 128 * session.num_chunks
    assert puller.stats.bytes_read - before == expected  # no DeepStack bytes at all when D = 0
    assert zero(puller.buffers.in_use())
    peer.call("reclaim", 0)
    assert zero(peer.in_use())


def test_three_chunks_each_carry_their_own_rows(peer, puller):
    d = peer.deepstack
    want = synthetic_prompt(3, 230, 150, H, d, 3)
    cfg = puller.buffers.config
    with puller.open(peer.stage(3, 230, 150, 3)) as session:
        visual_per_chunk = []
        for k, chunk in enumerate(session.chunks()):
            assert_same(chunk, want.slice(k * CHUNK, (k + 1) * CHUNK))
            visual_per_chunk.append(chunk.num_visual)
            # local multimodal memory is one chunk's blocks, whatever the prompt length
            used = puller.buffers.in_use()
            assert used["token_blocks"] <= blocks_for(CHUNK, cfg.block_tokens)
            assert used["visual_blocks"] <= blocks_for(CHUNK, cfg.block_visual)
    assert len(visual_per_chunk) == 4 and sum(v > 0 for v in visual_per_chunk) >= 3
    assert zero(puller.buffers.in_use())


def test_release_and_ttl_reclaim(peer, puller):
    handle = peer.stage(1, 40, 20)
    assert peer.in_use()["slots"] == 1
    puller.pull(handle)
    assert peer.call("reclaim", 0) == 1
    assert zero(peer.in_use())
    # a reused handle fails: the slot was reclaimed
    with pytest.raises(HandleExpiredError, match="expired"):
        puller.pull(handle)
    late = peer.stage(2, 40, 20)
    assert peer.call("reclaim", 0) == 0  # not released, not old
    assert peer.call("reclaim", 10_000) == 1  # past handle_ttl_s
    with pytest.raises(HandleExpiredError, match=r"expired: the encoder reclaimed slot \d+"):
        puller.pull(late)
    assert zero(peer.in_use()) and zero(puller.buffers.in_use())


def test_forged_nonce(peer, puller):
    handle = peer.stage(4, 40, 20)
    forged = json.loads(handle)
    forged["nonce"] += 1
    with pytest.raises(HandleError, match="nonce mismatch, the handle is forged or reused") as e:
        puller.pull(json.dumps(forged))
    assert e.value.code == "INVALID_ARG" and peer.session_id in str(e.value)
    assert zero(puller.buffers.in_use())
    # the forged attempt did not release the real slot, which still reads correctly
    assert_same(puller.pull(handle), synthetic_prompt(4, 40, 20, H, peer.deepstack))
    peer.call("reclaim", 0)
    assert zero(peer.in_use())


@pytest.mark.parametrize("mutate,message", [
    (lambda h: b"not json", "malformed handle"),
    (lambda h: json.dumps({k: v for k, v in json.loads(h).items() if k != "slot"}), "malformed handle"),
    (lambda h: json.dumps({**json.loads(h), "version": 99}), "handle version 99 is not supported"),
    (lambda h: json.dumps({**json.loads(h), "hidden_size": 2048}), "hidden size 2048"),
    (lambda h: json.dumps({**json.loads(h), "token_blocks": []}), "0 token blocks for 40 tokens"),
    (lambda h: json.dumps({**json.loads(h), "peer": "192.0.2.1:4000"}), "'192.0.2.1' is not in the allowed encoder hosts"),
])
def test_bad_handles(peer, puller, mutate, message):
    handle = peer.stage(5, 40, 20)
    with pytest.raises(HandleError, match=message) as e:
        puller.pull(mutate(handle))
    assert e.value.code == "INVALID_ARG"
    assert zero(puller.buffers.in_use())
    puller.pull(handle)
    peer.call("reclaim", 0)
    assert zero(peer.in_use())


def test_unreachable_peer(peer, puller):
    handle = json.loads(peer.stage(6, 40, 20))
    handle["peer"] = "127.0.0.1:1"
    with pytest.raises(PeerError, match="encoder peer 127.0.0.1:1 is unreachable") as e:
        puller.pull(json.dumps(handle))
    assert e.value.code == "UNAVAILABLE"
    assert zero(puller.buffers.in_use())
    peer.call("reclaim", 10_000)
    assert zero(peer.in_use())


def test_32_concurrent_pulls(peer, puller):
    d = peer.deepstack
    sizes = [(s, 20 + 13 * s, 7 * s % 90, 1 + s % 3) for s in range(32)]
    handles = [peer.stage(s, L, V, n) for s, L, V, n in sizes]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(puller.pull, handles))
    for (s, L, V, n), got in zip(sizes, results):
        assert_same(got, synthetic_prompt(s, L, V, H, d, n))
    assert zero(puller.buffers.in_use())
    assert peer.call("reclaim", 0) == 32
    assert zero(peer.in_use())


def test_encoder_pool_full_is_back_pressure(transport):
    peer = EncoderPeer(hidden=H, deepstack=3, alloc_wait_s=0.3,
                       buffer_config=dict(block_tokens=16, block_visual=16, num_token_blocks=8, num_visual_blocks=4, num_slots=4))
    puller = make_puller(transport, 3)
    try:
        first = peer.stage(1, 64, 64)  # all 4 visual blocks
        t = time.monotonic()
        with pytest.raises(PoolFullError, match="encoder buffers full") as e:
            peer.stage(2, 16, 1)
        assert e.value.code == "UNAVAILABLE" and time.monotonic() - t >= 0.3
        puller.pull(first)  # the release frees room for the next request
        assert_same(puller.pull(peer.stage(2, 16, 1)), synthetic_prompt(2, 16, 1, H, 3))
        peer.call("reclaim", 0)
        assert zero(peer.in_use())
    finally:
        puller.close()
        peer.close()


def test_encoder_killed_mid_pull(transport):
    peer = EncoderPeer(hidden=H, deepstack=3, buffer_config=ENC_BUFFERS)
    puller = make_puller(transport, 3)
    try:
        session = puller.open(peer.stage(9, 230, 150, 3))
        first = session.read_chunk(0)
        assert_same(first, synthetic_prompt(9, 230, 150, H, 3, 3).slice(0, CHUNK))
        peer.process.kill()
        peer.process.join(10)
        with pytest.raises(PeerError, match=f"encoder peer {peer.session_id} is unreachable or died") as e:
            session.read_chunk(1)
        assert e.value.code == "UNAVAILABLE"
        session.close()
        assert zero(puller.buffers.in_use())
    finally:
        puller.close()
        peer.close()


def test_handle_codec_round_trip(peer):
    h = Handle.decode(peer.stage(12, 30, 10))
    assert Handle.decode(h.encode()) == h and len(h.encode()) < 1024
    peer.call("reclaim", 10_000)
