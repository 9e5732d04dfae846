"""MultimodalDataBuffers and the Mooncake pull, between real engines in separate OS processes."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qwen3vl_epd.errors import HandleError, HandleExpiredError, PeerError, PoolFullError
from qwen3vl_epd.transfer.blocks import blocks_for
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.transfer.handle import Handle
from qwen3vl_epd.transfer.puller import Puller
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport
from support.peers import TEST_KEY, EncoderPeer, SilentPeer, resign, synthetic_prompt

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
    return Puller(MultimodalDataBuffers(H, deepstack, torch.float32, cfg), transport, HandleKeys(TEST_KEY),
                  chunk_tokens=chunk, **kw)


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
    assert [tuple(s) for s in got.visual_spans] == [tuple(s) for s in want.visual_spans]


@pytest.mark.parametrize("length,visual,images", [(20, 0, 0), (10, 1, 1), (60, 37, 1), (230, 150, 3)],
                         ids=["V0", "V1", "V37_not_block_multiple", "three_chunks"])
def test_round_trip_bit_exact(peer, puller, length, visual, images):
    d = peer.deepstack
    handle = peer.stage(7, length, visual, images)
    before, contacts = puller.stats.bytes_read, puller.stats.first_contacts
    with puller.open(handle) as session:
        assert session.num_chunks == blocks_for(length, CHUNK)
        got = session.read_all()
    assert_same(got, synthetic_prompt(7, length, visual, H, d, images))
    row = 4 + 12
    expected = length * row + visual * H * 4 * (1 + d) + 2 * 128 * session.num_chunks
    expected += 128 * (puller.stats.first_contacts - contacts)  # the header read of a first contact with the peer
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
    # a reused handle fails: here it was opened already; on another server, its slot was reclaimed
    with pytest.raises(HandleError, match="was already opened on this server"):
        puller.pull(handle)
    other = make_puller(puller.transport, peer.deepstack)
    try:
        with pytest.raises(HandleExpiredError, match="expired"):
            other.pull(handle)
    finally:
        other.close()
    late = peer.stage(2, 40, 20)
    assert peer.call("reclaim", 0) == 0  # not released, not old
    assert peer.call("reclaim", 10_000) == 1  # past handle_ttl_s
    with pytest.raises(HandleExpiredError, match=r"expired: the encoder reclaimed slot \d+"):
        puller.pull(late)
    assert zero(peer.in_use()) and zero(puller.buffers.in_use())


def test_forged_nonce(peer, puller):
    """Behind the signature, the header check still refuses a nonce the encoder did not stage."""
    handle = peer.stage(4, 40, 20)
    forged = json.loads(handle)
    forged["nonce"] += 1
    with pytest.raises(HandleError, match="nonce mismatch, the handle is forged or reused") as e:
        puller.pull(resign(forged))
    assert e.value.code == "INVALID_ARG" and peer.session_id in str(e.value)
    assert zero(puller.buffers.in_use())
    # the forged attempt did not release the real slot, which still reads correctly
    assert_same(puller.pull(handle), synthetic_prompt(4, 40, 20, H, peer.deepstack))
    peer.call("reclaim", 0)
    assert zero(peer.in_use())


# Behind the signature (altered, then signed again as only a key holder could), each check still holds.
@pytest.mark.parametrize("mutate,message", [
    (lambda h: b"not json", "malformed handle"),
    (lambda h: resign({k: v for k, v in json.loads(h).items() if k != "slot"}), "malformed handle"),
    (lambda h: resign({**json.loads(h), "version": 99}), "handle version 99 is not supported"),
    (lambda h: resign({**json.loads(h), "hidden_size": 2048}), "hidden size 2048"),
    (lambda h: resign({**json.loads(h), "token_blocks": []}), "0 token blocks for 40 tokens"),
    (lambda h: resign({**json.loads(h), "peer": "192.0.2.1:4000"}), "'192.0.2.1' is not in the allowed encoder hosts"),
    (lambda h: resign({**json.loads(h), "expires_ms": int(time.time() * 1000) - 1000}), r"expired \d+\.\d s ago"),
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
    handle["peer"] = "127.0.0.1:1"  # a closed port
    t = time.monotonic()
    with pytest.raises(PeerError, match="encoder peer 127.0.0.1:1 is unreachable") as e:
        puller.pull(resign(handle))
    assert time.monotonic() - t < puller.timeout_s
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
    keys = HandleKeys(TEST_KEY)
    h = Handle.decode(peer.stage(12, 30, 10), keys)
    assert Handle.decode(h.encode(keys), keys) == h and len(h.encode(keys)) < 1024
    peer.call("reclaim", 10_000)


def _tampered(fields: dict, name: str) -> dict:
    """The handle with one field changed, as an attacker would, and not signed again."""
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, (int, str, list, dict)):
        raise TypeError(name)
    if isinstance(value, int):
        changed = value + 1
    elif isinstance(value, str):
        changed = "127.0.0.1:2" if name == "peer" else value + "x"
    elif isinstance(value, list):
        changed = value + [value[-1] if value else 0]
    else:
        changed = {**value, "aux": value["aux"] + 128}
    return {**fields, name: changed}


def test_unsigned_forged_and_tampered_handles_cause_no_traffic(peer, puller):
    handle = peer.stage(21, 40, 20)
    fields = json.loads(handle)
    before = (puller.stats.bytes_read, puller.stats.first_contacts)
    attempts = {"unsigned": {k: v for k, v in fields.items() if k != "signature"},
                "forged": {**fields, "signature": "0" * 64},
                "another server's key": json.loads(resign(fields, key="a1" * 32))}
    attempts.update({f"tampered {name}": _tampered(fields, name) for name in fields if name != "signature"})
    assert len(attempts) >= 20
    for what, attempt in attempts.items():
        with pytest.raises(HandleError, match="handle signature is missing or wrong") as e:
            puller.open(json.dumps(attempt))
        assert e.value.code == "INVALID_ARG", what
    assert (puller.stats.bytes_read, puller.stats.first_contacts) == before  # not one Mooncake read
    assert zero(puller.buffers.in_use())
    assert_same(puller.pull(handle), synthetic_prompt(21, 40, 20, H, peer.deepstack))  # untouched, still served
    peer.call("reclaim", 0)
    assert zero(peer.in_use())


def test_tampered_peer_gets_no_connection(peer, puller):
    silent = SilentPeer()
    try:
        fields = {**json.loads(peer.stage(22, 40, 20)), "peer": silent.address}
        with pytest.raises(HandleError, match="signature"):
            puller.open(json.dumps(fields))
        time.sleep(0.2)
        assert silent.connections == 0
    finally:
        silent.close()
        peer.call("reclaim", 10_000)
    assert zero(peer.in_use())


def test_a_handle_of_another_servers_key(transport, puller):
    other = EncoderPeer(hidden=H, deepstack=puller.buffers.num_deepstack, buffer_config=ENC_BUFFERS, key="a1" * 32)
    try:
        with pytest.raises(HandleError, match="signed with a key this server does not accept"):
            puller.pull(other.stage(23, 40, 20))
        assert other.call("reclaim", 0) == 0  # nothing was released: nothing reached it
    finally:
        other.close()
    assert zero(puller.buffers.in_use())


def test_double_open_and_replay(peer, puller):
    handle = peer.stage(24, 40, 20)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _try(puller.pull, handle), range(2)))
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and "was already opened on this server" in str(errors[0])
    assert errors[0].code == "INVALID_ARG"
    with pytest.raises(HandleError, match="was already opened"):  # and after its use
        puller.pull(handle)
    assert peer.call("reclaim", 0) == 1 and zero(peer.in_use()) and zero(puller.buffers.in_use())


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_stalled_peer_fails_within_the_bound(peer, transport):
    """A peer that accepts and never answers: the read fails after timeout_s, holding no pool block;
    later handles for that peer fail at once while the stuck transfer waits out Mooncake's 60 s."""
    puller = make_puller(transport, peer.deepstack, timeout_s=1.0)
    silent = SilentPeer()
    try:
        fields = {**json.loads(peer.stage(25, 40, 20)), "peer": silent.address}
        t = time.monotonic()
        with pytest.raises(PeerError, match=f"encoder peer {silent.address} did not answer within 1 s") as e:
            puller.pull(resign(fields))
        assert e.value.code == "UNAVAILABLE" and 1.0 <= time.monotonic() - t < 2.0
        assert zero(puller.buffers.in_use())
        t = time.monotonic()
        with pytest.raises(PeerError, match="is not answering"):
            puller.pull(resign({**fields, "nonce": fields["nonce"] + 1}))
        assert time.monotonic() - t < 0.5
        # the real encoder is still served meanwhile
        assert_same(puller.pull(peer.stage(26, 40, 20)), synthetic_prompt(26, 40, 20, H, peer.deepstack))
    finally:
        silent.close()
        puller.close()
    peer.call("reclaim", 10_000)
    assert zero(peer.in_use())


def test_released_token_rows_are_zeroed(peer, puller):
    handles = [peer.stage(27 + i, 100, 20) for i in range(3)]
    assert int(peer.call("token_rows").count_nonzero()) > 0
    for h in handles:
        puller.pull(h)
    assert peer.call("reclaim", 0) == 3
    assert int(peer.call("token_rows").count_nonzero()) == 0  # no prompt ids left for anyone to read


LISTENERS = """
import json, os, sys
from qwen3vl_epd.transfer.transport import MooncakeTransport
t = MooncakeTransport("127.0.0.1", "tcp", ports=sys.argv[1])
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if link.startswith("socket:["):
        inodes.add(link[8:-1])
found = []
for table in ("tcp", "tcp6"):
    for line in open(f"/proc/self/net/{table}").read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            address, port = f[1].rsplit(":", 1)
            found.append([table, address, int(port, 16)])
print(json.dumps({"rpc": t.engine.get_rpc_port(), "listeners": found}))
"""


def test_mooncake_listeners_take_ports_from_the_configured_range():
    """Mooncake binds its two listeners to every address whatever host it is given (README); what
    can be set is the port range, so a firewall rule can name them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LISTENERS, "21400-21420"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    ports = [port for _, _, port in got["listeners"]]
    assert len(ports) >= 2 and got["rpc"] in ports, got
    assert all(21400 <= p <= 21420 for p in ports), got
    print("Mooncake listeners:", got["listeners"])
