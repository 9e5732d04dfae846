"""Block pools and MultimodalDataBuffers, in process."""

import pytest
import torch

from qwen3vl_epd.transfer.blocks import BlockAllocator, BlockError
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from support.peers import synthetic_prompt

pytestmark = pytest.mark.unit

H = 64


def zero(d):
    return all(v == 0 for v in d.values())


def test_block_allocator_errors():
    pool = BlockAllocator("visual blocks", 4)
    ids = pool.allocate(3)
    assert pool.allocate(2) is None and pool.in_use() == 3
    pool.free(ids[:1])
    with pytest.raises(BlockError, match="double free"):
        pool.free(ids[:1])
    with pytest.raises(BlockError, match="not a block of this pool"):
        pool.free([17])
    pool.free(ids[1:])
    assert pool.in_use() == 0


def test_buffers_scale_with_visual_rows_and_scatter_gather():
    b = MultimodalDataBuffers(H, 3, torch.float32, BufferConfig(block_tokens=16, block_visual=16))
    p = synthetic_prompt(11, 300, 20, H, 3, 2)
    slot, tok, vis = b.allocate(p.length, p.num_visual)
    assert (len(tok), len(vis)) == (19, 2)  # visual memory follows V (20 rows), not L (300)
    b.scatter(tok, vis, p.fill_ids, p.mrope_positions, p.embeddings, p.deepstack)
    fill, mrope, emb, ds = b.gather(tok, vis, p.length, p.num_visual)
    assert torch.equal(fill, p.fill_ids) and torch.equal(mrope, p.mrope_positions)
    assert torch.equal(emb, p.embeddings) and torch.equal(ds, p.deepstack)
    b.free(slot, tok, vis)
    assert zero(b.in_use())
    assert "deepstack" not in MultimodalDataBuffers(H, 0, torch.float32).regions()
