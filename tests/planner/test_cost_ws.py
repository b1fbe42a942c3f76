"""The cost model of the warp-specialized Gluon kernels (cost.predict_ws): their shared memory,
the work of the SM that finishes last, and their predicted times against the H200 measurements
the constants were fitted to (docs/planner_ws.json)."""

import json
import os
import statistics

import pytest
import torch

from flashfx.planner import cost, hardware
from flashfx.runtime import gpu

H200 = hardware.KNOWN["H200"]
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "planner_ws.json")


def _shape(n, d, causal=False, group=1, batch_heads=1, n_k=None):
    return cost.Shape(n, n_k or n, d, 2, causal, group, batch_heads)


# shared memory of each kernel as Triton 3.9 compiles it for sm_90a (benchmarks/sm90_registers.py)
COMPILED_SMEM = {("fwd", 64): 98696, ("fwd", 128): 197000, ("dkdv", 64): 66928, ("dkdv", 128): 132464,
                 ("dq", 64): 82520, ("dq", 128): 164440}


@pytest.mark.parametrize("kernel, head_dim", sorted(COMPILED_SMEM))
def test_shared_memory_is_what_the_compiler_allocates(kernel, head_dim):
    p = cost.predict_ws(kernel, _shape(1024, head_dim), H200)
    assert p.sram_bytes == COMPILED_SMEM[kernel, head_dim] and p.fits


def test_the_model_has_the_kernels_tiles():
    from flashfx.codegen import hopper, hopper_bwd

    fwd, dkdv, dq = (cost.WS_KERNELS[k] for k in ("fwd", "dkdv", "dq"))
    assert (fwd.held, fwd.block, fwd.stages) == (2 * hopper.BLOCK_M, hopper.BLOCK_N, hopper.STAGES)
    assert (dkdv.held, dkdv.block, dkdv.stages) == (2 * hopper_bwd.BLOCK_K, hopper_bwd.BLOCK_M, hopper_bwd.STAGES)
    assert (dq.held, dq.block, dq.stages) == (2 * hopper_bwd.DQ_BLOCK_M, hopper_bwd.DQ_BLOCK_N, hopper_bwd.DQ_STAGES)


def test_the_persistent_forward_walks_pairs_round_robin():
    # 8 query tiles a head make 4 pairs; under a causal mask every pair visits 8 + 1 key blocks
    steps, units = cost.ws_work("fwd", _shape(1024, 128, causal=True, batch_heads=33), 132)
    assert (steps, units) == (9, 1)  # 132 pairs on 132 SMs
    steps, units = cost.ws_work("fwd", _shape(1024, 128, causal=True, batch_heads=34), 132)
    assert (steps, units) == (18, 2)  # 136 pairs: four SMs walk two
    steps, units = cost.ws_work("fwd", _shape(1024, 128, batch_heads=33), 132)
    assert (steps, units) == (16, 1)  # no mask: two tiles of 8 blocks each
    # a single middle tile (odd tile count) counts once
    steps, _ = cost.ws_work("fwd", _shape(384, 128, causal=True, batch_heads=1), 132)
    assert steps == 4  # tiles 0 and 2: 1 + 3 blocks; tile 1 alone: 2
    assert cost.ws_work("fwd", _shape(384, 128, causal=True, batch_heads=1), 1) == (6, 2)


def test_the_backward_programs_fill_the_sms_as_they_free_up():
    # dK/dV: 128 keys a program, 64-query blocks; under a causal mask key tile j sees the query
    # blocks from 2j on
    steps, units = cost.ws_work("dkdv", _shape(512, 128, causal=True, batch_heads=1), 132)
    assert (steps, units) == (8, 1)  # four programs of 8, 6, 4, 2 blocks, one an SM
    assert cost.ws_work("dkdv", _shape(512, 128, causal=True, batch_heads=1), 1) == (20, 4)
    # GQA: a program walks its group's query heads
    assert cost.ws_work("dkdv", _shape(512, 128, group=4, batch_heads=4), 132) == (32, 1)
    # dQ: 128 query rows a program, 64-key blocks; tile i sees 2(i + 1) blocks
    assert cost.ws_work("dq", _shape(512, 128, causal=True, batch_heads=1), 132) == (8, 1)
    # more keys than queries: bottom-right, every query sees the extra keys
    assert cost.ws_work("dq", _shape(128, 128, causal=True, batch_heads=1, n_k=640), 132) == (10, 1)


def test_predictions_match_the_measurements_they_were_fitted_to():
    with open(DATA) as f:
        points = json.load(f)["points"]
    ratios = []
    for p in points:
        shape = cost.Shape(p["N"], p["N"], p["D"], 2, p["causal"], p["H"] // p["Hk"], p["B"] * p["H"])
        order = p.get("heads_first", False)  # the order the point was measured with
        ratios.append(cost.predict_ws(p["kernel"], shape, H200, order=order).time_s * 1e6 / p["us"])
    assert {p["kernel"] for p in points} == {"fwd", "dkdv", "dq"} and len(points) >= 30
    assert statistics.median(abs(r - 1) for r in ratios) < 0.04
    assert all(0.75 < r < 1.25 for r in ratios), ratios


def test_only_the_head_dims_the_kernels_run_at_are_modelled():
    with pytest.raises(ValueError, match="no warp-specialized dq at head dim 96"):
        cost.predict_ws("dq", _shape(1024, 96), H200)


def test_explain_gives_the_predicted_time_on_a_gpu(monkeypatch):
    import importlib

    from flashfx.ir import ScoreProgram
    from flashfx.runtime import tiles as tiling

    explain = importlib.import_module("flashfx.explain")  # the module; flashfx.explain is its function
    monkeypatch.setattr(tiling, "gpu_of", lambda device: H200)
    shapes = [(4, 16, 4096, 128), (4, 16, 4096, 128)]
    causal = ScoreProgram(causal="top_left")
    text = explain._ws_time(gpu.call_shape(*shapes, 2, causal), torch.device("cuda"))
    want = cost.predict_ws("dkdv", _shape(4096, 128, causal=True, batch_heads=64), H200).time_s * 1e6
    assert text("dkdv") == f", {want:.0f} us"
    assert explain._ws_time(gpu.call_shape(*shapes, 2, causal), torch.device("cpu"))("dkdv") == ""


def test_heads_first_starts_every_heads_longest_program_first():
    # dK/dV, causal: 4 key tiles of 8, 6, 4, 2 query blocks, 3 heads, 4 SMs. Head by head, the
    # third head's 8 starts after the SMs have taken 8, 6, 4, 2, 8, 6, 4, 2 and finishes last
    # (18 blocks and 3 units); heads first, the three 8s start together (16 and 3)
    def finish(work):
        steps, units = work
        return steps + 2 * units  # a unit counts as 2 steps in ws_work

    shape = _shape(512, 128, causal=True, batch_heads=3)
    assert cost.ws_work("dkdv", shape, 4) == (18, 3)
    assert cost.ws_work("dkdv", shape, 4, heads_first=True) == (16, 3)
    assert finish(cost.ws_work("dkdv", _shape(4096, 64, causal=True, batch_heads=24), 132, heads_first=True)) < \
        finish(cost.ws_work("dkdv", _shape(4096, 64, causal=True, batch_heads=24), 132))
    # without a mask every program is as long: the order changes nothing
    full = _shape(512, 128, batch_heads=2)
    assert cost.ws_work("dkdv", full, 2) == cost.ws_work("dkdv", full, 2, heads_first=True)
    # dQ starts a head's last (longest) query tile first in both orders
    assert cost.ws_work("dq", _shape(512, 128, causal=True, batch_heads=1), 1) == (20, 4)


@pytest.mark.parametrize("kernel, n, d, batch_heads, group, causal, want", [
    ("dkdv", 4096, 64, 24, 1, True, True),     # GPT-2 small's layer at seq 4096: Q, dO 25 MB
    ("dq", 1024, 64, 96, 1, True, True),       # and at seq 1024
    ("dkdv", 4096, 128, 64, 1, True, False),   # Q, dO of 64 heads: 134 MB, more than L2 holds
    ("dq", 4096, 128, 64, 4, True, True),      # dQ streams K, V: 16 K/V heads, 34 MB
    ("dkdv", 4096, 64, 24, 1, False, False),   # no mask: programs alike, order kept for L2
    ("fwd", 4096, 64, 24, 1, True, False),     # the forward has its own schedule
])
def test_heads_first_where_the_streamed_tensors_fit_in_l2(kernel, n, d, batch_heads, group, causal, want):
    shape = _shape(n, d, causal=causal, group=group, batch_heads=batch_heads)
    assert cost.heads_first(kernel, shape, H200) is want
    if want:  # where it is taken, the model predicts it faster
        assert (cost.predict_ws(kernel, shape, H200, order=True).time_s
                < cost.predict_ws(kernel, shape, H200, order=False).time_s)


def test_explain_says_which_backward_kernels_start_heads_first(monkeypatch):
    import importlib

    from flashfx.ir import ScoreProgram
    from flashfx.runtime import tiles as tiling

    explain = importlib.import_module("flashfx.explain")
    monkeypatch.setattr(tiling, "gpu_of", lambda device: H200)
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    gpt2 = [(2, 12, 4096, 64), (2, 12, 4096, 64)]
    causal = ScoreProgram(causal="top_left")
    note = explain._order_note(gpu.call_shape(*gpt2, 2, causal), cuda)
    assert "bwd dQ and dK/dV programs start heads first" in note
    assert explain._order_note(gpu.call_shape(*gpt2, 2, ScoreProgram()), cuda) == ""  # no mask
    big = [(4, 16, 4096, 128), (4, 16, 4096, 128)]  # Q and dO of 64 heads: 134 MB
    assert explain._order_note(gpu.call_shape(*big, 2, causal), cuda) == ""
    assert explain._order_note(gpu.call_shape(*gpt2, 2, causal), torch.device("cpu")) == ""
    monkeypatch.setattr(gpu, "HEADS_FIRST", False)
    assert explain._order_note(gpu.call_shape(*gpt2, 2, causal), cuda) == ""
