import dataclasses

import pytest

from flashfx.planner import hardware
from flashfx.planner.hardware import KNOWN
from flashfx.planner.plan import candidates, kv_splits, plan

# the limits of each architecture the planner must respect, whatever GPU carries them
LIMITS = {
    "sm80": KNOWN["A100"],
    "sm86": KNOWN["A10"],
    "sm89": KNOWN["L4"],
    "sm90": KNOWN["H100"],
}


@pytest.mark.parametrize("arch", sorted(LIMITS))
@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("elt", [2, 4])
def test_plan_never_exceeds_sram_or_registers(arch, head_dim, elt):
    g = LIMITS[arch]
    p = plan(head_dim, elt, g)
    assert p.head_dim_pad >= head_dim and p.head_dim_pad & (p.head_dim_pad - 1) == 0
    for t in (p.fwd, p.bwd_dkdv, p.bwd_dq):
        assert t.sram_bytes <= g.smem_per_block
        assert t.block_m >= 16 and t.block_n >= 16 and t.num_stages >= 1
        assert t.num_warps * 32 * min(t.regs, g.max_regs_per_thread) <= g.regs_per_sm


@pytest.mark.parametrize("gpu", sorted(KNOWN))
@pytest.mark.parametrize("shape", [dict(n_q=128), dict(n_q=1, n_k=8192, causal=True),
                                   dict(n_q=16384, causal=True, group=8, batch_heads=8)])
def test_plan_fits_every_known_gpu_and_shape(gpu, shape):
    g = KNOWN[gpu]
    for head_dim in (64, 256):
        p = plan(head_dim, 2, g, **shape)
        assert p.sram_used <= p.sram_limit == g.smem_per_block
        for t in (p.fwd, p.bwd_dkdv, p.bwd_dq):
            assert t.time_s > 0 and t.bound_ratio >= 1


def test_plan_shrinks_on_small_sram():
    # D=256 bf16: an H100's 227 KiB hold what an A10's 99 KiB cannot
    big, small = plan(256, 2, KNOWN["H100"]), plan(256, 2, KNOWN["A10"])
    assert big.fwd.sram_bytes > KNOWN["A10"].smem_per_block
    assert small.fwd.sram_bytes <= KNOWN["A10"].smem_per_block


def _tiles(t):
    return t.block_m, t.block_n, t.num_warps, t.num_stages


def _replay(name: str):
    """The planner replayed on a recorded H200 sweep in docs/: (its shapes, planner_fit's scores)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import planner_fit

    cases, gpu = planner_fit.load(os.path.join(root, "docs", name))
    assert gpu.name == "H200"
    return cases, planner_fit.score(cases, gpu, {"fwd": None, "dkdv": None, "dq": None})


def test_choices_against_the_h200_sweep():
    """docs/planner_sweep.json timed every sound config of every kernel at 24 shapes on an
    H200: replayed there, the planner's untuned choices keep the throughput they had when the
    calibration was fitted (a change to the model that ranks worse fails here)."""
    cases, s = _replay("planner_sweep.json")
    assert len(cases) == 24 and s["untimed"] == []  # this sweep timed both dK/dV orientations
    assert s["fwd_median"] >= 0.95 and s["fwd_min"] >= 0.9
    assert s["bwd_median"] >= 0.95 and s["bwd_min"] >= 0.85


def test_choices_against_the_long_sequence_sweep():
    """docs/planner_sweep_long.json: the same sweep at N = 16384 (B = 1, MHA). Before the
    forward learned a program's pipeline fill and a tile's transfer time it chose 64x64 at
    d=128 there, 0.878 of the best (128x128, 8 warps, 3 stages)."""
    cases, s = _replay("planner_sweep_long.json")
    assert len(cases) == 6 and {c.n for c in cases} == {16384}
    # it timed queries-down dK/dV only: the measured keys-down choices (d=128 causal MHA, d=64
    # MHA) are not in it
    assert s["untimed"] == [("D=64 N=16384 full MHA", "dkdv"), ("D=64 N=16384 causal MHA", "dkdv"),
                            ("D=128 N=16384 causal MHA", "dkdv")]
    assert s["fwd_median"] >= 0.95 and s["fwd_min"] >= 0.95
    assert s["bwd_median"] >= 0.95 and s["bwd_min"] >= 0.9


def test_choices_against_the_d64_mha_resweep():
    """docs/planner_sweep_d64mha.json: the four d=64 MHA shapes of the sweep timed again after
    dK/dV's full query blocks stopped masking their row statistics, when keys down became the
    measured choice there. The main sweep's keys-down times at d=64 predate that change."""
    cases, s = _replay("planner_sweep_d64mha.json")
    assert len(cases) == 4 and {(c.shape.head_dim, c.shape.group) for c in cases} == {(64, 1)} and s["untimed"] == []
    assert s["fwd_median"] >= 0.95 and s["fwd_min"] >= 0.95
    assert s["bwd_median"] >= 0.98 and s["bwd_min"] >= 0.98


def test_predicted_rates_are_plausible_on_h200():
    p = plan(128, 2, KNOWN["H200"])
    tflops = 4 * 4096 * 4096 * 128 * 64 / p.fwd.time_s / 1e12
    assert 300 < tflops < 700  # measured 467


def test_prediction_grows_with_n():
    g = KNOWN["H200"]
    times = [plan(128, 2, g, n_q=n, batch_heads=16).fwd.time_s for n in (512, 2048, 8192)]
    assert times == sorted(times)


def test_candidates_ranked_and_fit():
    g = KNOWN["A10"]
    cs = candidates("fwd", 128, 2, g, k=5)
    assert len(cs) == 5
    assert [c.time_s for c in cs] == sorted(c.time_s for c in cs)
    assert all(c.sram_bytes <= g.smem_per_block for c in cs)
    assert _tiles(cs[0]) == _tiles(plan(128, 2, g).fwd)


def test_dkdv_orientations_among_the_candidates():
    """On wgmma GPUs the dK/dV candidates (what autotune times) hold both orientations for
    16-bit inputs: at d=128 the model ranks queries down first and keys down 32x64 among the
    next; fp32 inputs, sm8x and the other kernels have queries down only."""
    h200 = KNOWN["H200"]
    shape = dict(n_q=4096, n_k=4096, causal=False, batch_heads=64)
    cs = candidates("dkdv", 128, 2, h200, k=4, **shape)
    assert not cs[0].keys_down and any(c.keys_down and (c.block_m, c.block_n) == (32, 64) for c in cs)
    p = plan(128, 2, h200, **shape)
    assert not p.bwd_dkdv.keys_down and "keys down" not in p.summary()
    assert dataclasses.replace(p, bwd_dkdv=next(c for c in cs if c.keys_down)).summary().count("keys down") == 1
    causal = dict(shape, causal=True)
    assert not any(c.keys_down for c in candidates("dkdv", 128, 4, h200, k=20, **causal))
    assert not any(c.keys_down for c in candidates("dkdv", 128, 2, KNOWN["A100"], k=20, **causal))
    assert not any(c.keys_down for k in ("fwd", "dq") for c in candidates(k, 128, 2, h200, k=20, **causal))


@pytest.mark.parametrize("n, bh", [(1024, 256), (4096, 64), (16384, 16)])
def test_dkdv_keys_down_where_measured_only(n, bh):
    """Causal MHA at d=128, 16-bit, on wgmma GPUs: dK/dV keys down 32x64, 4 warps, 3 stages,
    measured faster than the model's choice at every N (plan._MEASURED); the neighbouring
    families (GQA, no mask, d=64, fp32 inputs, score operands, sm8x) keep the model's ranking."""
    h200 = KNOWN["H200"]
    shape = dict(n_q=n, n_k=n, causal=True, batch_heads=bh)
    for g in (KNOWN["H200"], KNOWN["H100"]):
        t = plan(128, 2, g, **shape).bwd_dkdv
        assert (t.block_m, t.block_n, t.num_warps, t.num_stages, t.keys_down) == (32, 64, 4, 3, True)
        assert candidates("dkdv", 128, 2, g, k=1, **shape)[0] == t  # what autotune times first
    model = [c for c in candidates("dkdv", 128, 2, h200, k=30, **shape)]
    assert sorted(model[1:], key=lambda c: c.time_s) == model[1:]  # the rest in the model's order
    for other in (dict(shape, group=4), dict(shape, causal=False), dict(shape, operand_bytes=2),
                  dict(shape, products=3)):
        assert plan(128, 2, h200, **other).bwd_dkdv == candidates("dkdv", 128, 2, h200, k=30, **other)[0]
        assert not plan(128, 2, h200, **other).bwd_dkdv.keys_down or other.get("group", 1) == 1
    assert not plan(128, 4, h200, **shape).bwd_dkdv.keys_down
    assert not plan(128, 2, KNOWN["A100"], **shape).bwd_dkdv.keys_down


@pytest.mark.parametrize("n, bh", [(1024, 512), (4096, 24), (4096, 128), (16384, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_dkdv_keys_down_64x64_at_d64_mha(n, bh, causal):
    """MHA at d=64, 16-bit, on wgmma GPUs, with or without a causal mask: dK/dV keys down 64x64,
    4 warps, 3 stages (plan._MEASURED), ahead of the model's queries-down 64x64; GQA, fp32
    inputs, score operands and sm8x keep the model's ranking."""
    shape = dict(n_q=n, n_k=n, causal=causal, batch_heads=bh)
    for g in (KNOWN["H200"], KNOWN["H100"]):
        t = plan(64, 2, g, **shape).bwd_dkdv
        assert (t.block_m, t.block_n, t.num_warps, t.num_stages, t.keys_down) == (64, 64, 4, 3, True)
        assert candidates("dkdv", 64, 2, g, k=1, **shape)[0] == t
        assert "keys down" in plan(64, 2, g, **shape).summary()
    h200 = KNOWN["H200"]
    for other in (dict(shape, group=4), dict(shape, operand_bytes=2), dict(shape, products=3)):
        assert plan(64, 2, h200, **other).bwd_dkdv == candidates("dkdv", 64, 2, h200, k=30, **other)[0]
    assert not plan(64, 4, h200, **shape).bwd_dkdv.keys_down
    assert not plan(64, 2, KNOWN["A100"], **shape).bwd_dkdv.keys_down
    assert plan(64, 2, h200, **shape).fwd == candidates("fwd", 64, 2, h200, k=1, **shape)[0]


def test_plan_for_an_absent_gpu():
    a10 = plan(128, 2, KNOWN["A10"])
    assert "A10" in a10.summary() and "KiB" in a10.summary()
    custom = dataclasses.replace(KNOWN["H100"], name="H100 with 64 KiB", smem_per_block=64 * 1024,
                                 smem_per_sm=64 * 1024)
    p = plan(128, 2, custom)
    assert p.sram_used <= 64 * 1024
    with hardware.overridden("L4"):
        assert hardware.current().name == "L4"


def test_positional_interpret_and_small_tiles():
    p = plan(64, 4, hardware.INTERPRETER, True)
    assert (p.fwd.block_m, p.fwd.block_n, p.fwd.num_stages) == (16, 16, 1)
    assert plan(64, 4, hardware.INTERPRETER, interpret=True) == p


def test_plan_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head dim"):
        plan(512, 2, KNOWN["H100"])


def test_key_range_splits_only_when_the_grid_leaves_sms_idle():
    h200 = KNOWN["H200"].sm_count
    # the benchmark shapes launch thousands of programs: never split
    assert kv_splits(programs=64 * 16, n_k=4096, block_n=64, sm_count=h200) == 1
    assert kv_splits(programs=h200 // 2, n_k=4096, block_n=64, sm_count=h200) == 1
    # decoding: one query block per batch·head, a long key range: enough parts for every SM
    assert kv_splits(programs=32, n_k=4096, block_n=64, sm_count=h200) == -(-h200 // 32)
    assert kv_splits(programs=1, n_k=1 << 16, block_n=64, sm_count=h200) == 16  # capped
    # every part keeps at least 4 key blocks
    assert kv_splits(programs=8, n_k=512, block_n=64, sm_count=h200) == 2
    assert kv_splits(programs=8, n_k=128, block_n=64, sm_count=h200) == 1


def test_3xtf32_plans_at_d64_do_not_spill_where_the_tf32_ones_would():
    """fp32 inputs without TF32 run three products and hold each operand's remainder: planned
    for that (products=3), the forward and dQ tiles at d=64 do not spill per ptxas, where the
    tiles planned as for one product do (docs/planner_fp32_regs.json, 3xTF32 on sm_90), and
    dK/dV spills less. (The grid has 1 and 2 stages; a plan of 3 or 4 is read as 2.)"""
    import json
    import os

    from flashfx.planner import hardware

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "planner_fp32_regs.json")) as f:
        spill = {(r["kernel"], r["D"], r["bm"], r["bn"], r["warps"], r["stages"]): r.get("spill")
                 for r in json.load(f)["rows"]}

    def spills(products):
        p = plan(64, 4, hardware.KNOWN["H200"], n_q=1024, n_k=1024, causal=True, batch_heads=16, products=products)
        return {k: spill[(k, 64, t.block_m, t.block_n, t.num_warps, min(t.num_stages, 2))]
                for k, t in (("fwd", p.fwd), ("dkdv", p.bwd_dkdv), ("dq", p.bwd_dq))}

    one, three = spills(1), spills(3)
    assert three["fwd"] == three["dq"] == 0 and one["fwd"] > 0
    assert three["dkdv"] < one["dkdv"]
