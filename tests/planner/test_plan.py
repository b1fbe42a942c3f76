import pytest

from flashfx.planner.hardware import KNOWN
from flashfx.planner.plan import plan


@pytest.mark.parametrize("gpu", sorted(KNOWN))
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("elt", [2, 4])
def test_plan_fits_shared_memory(gpu, head_dim, elt):
    g = KNOWN[gpu]
    p = plan(head_dim, elt, g)
    assert p.head_dim_pad >= head_dim and p.head_dim_pad & (p.head_dim_pad - 1) == 0
    for t in (p.fwd, p.bwd_dkdv, p.bwd_dq):
        assert t.sram_bytes <= g.smem_per_block
        assert t.block_m >= 16 and t.block_n >= 16 and t.num_stages >= 1


def test_plan_shrinks_on_small_sram():
    # D=256 bf16: H100's 227 KiB hold 3 stages of K/V; an A10's 99 KiB hold fewer
    big, small = plan(256, 2, KNOWN["H100"]), plan(256, 2, KNOWN["A10"])
    assert big.fwd.sram_bytes > KNOWN["A10"].smem_per_block
    assert small.fwd.sram_bytes <= KNOWN["A10"].smem_per_block
    assert small.fwd.num_stages < big.fwd.num_stages


def test_plan_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head dim"):
        plan(512, 2, KNOWN["H100"])
