"""The warp-specialized Gluon backward (codegen.hopper_bwd: dK/dV, and dQ with Δ): which calls
its kernels take, that they compile for sm_90 without spills, and on an sm_90 GPU their gradients
against float64."""

import math

import pytest
import torch

from flashfx.codegen import hopper, hopper_bwd
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime import gpu
from tests.codegen.test_hopper import _case, _rel
from tests.reference import reference_attention

CAUSAL = ScoreProgram((ScoreOp("scale", None, 128 ** -0.5),), "top_left")
CPU = torch.device("cpu")
gluon_only = pytest.mark.skipif(hopper.gluon is None, reason="this Triton has no Gluon")


@gluon_only
def test_supports_names_why_a_call_takes_the_generated_dkdv(monkeypatch):
    assert hopper_bwd.supports(CAUSAL, torch.float32, CPU, 128, 64, 64) == "inputs are not fp16/bf16"
    assert hopper_bwd.supports(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "not an sm_90 GPU"
    monkeypatch.setattr(hopper, "covers", lambda *args: None)  # as on an sm_90 GPU
    assert hopper_bwd.supports(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) is None
    assert "301 queries" in hopper_bwd.supports(CAUSAL, torch.bfloat16, CPU, 128, 301, 301)
    # no head-dim-64 rule: the forward's is its own (hopper.d64_rule)
    assert hopper_bwd.supports(ScoreProgram((ScoreOp("scale", None, 0.125),)), torch.bfloat16, CPU, 64, 64, 64) is None


def test_the_interpreter_and_the_switch_keep_the_generated_dkdv(monkeypatch):
    monkeypatch.setattr(gpu.tiling, "interpreting", lambda: True)
    assert gpu.ws_backward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "Triton interpreter"
    monkeypatch.setattr(gpu.tiling, "interpreting", lambda: False)
    monkeypatch.setattr(hopper_bwd, "supports", lambda *args: None)  # as on an sm_90 GPU
    monkeypatch.setattr(gpu, "TMA", False)
    assert gpu.ws_backward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "descriptor reads turned off (gpu.TMA, FLASHFX_TMA=0)"
    monkeypatch.setattr(gpu, "TMA", True)
    assert gpu.ws_backward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) is None
    monkeypatch.setattr(gpu, "WS_BACKWARD", False)
    assert gpu.ws_backward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "turned off"
    monkeypatch.setattr(gpu, "WS_BACKWARD", None)
    monkeypatch.setenv("FLASHFX_WS_BACKWARD", "0")
    assert gpu.ws_backward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "turned off"
    monkeypatch.delenv("FLASHFX_WS_BACKWARD")
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) == "not an sm_90 GPU"  # the forward's own
    # dQ: the same switch, its own off switch, and no rule on Nq (it reads the statistics by pointer)
    monkeypatch.setattr(hopper, "covers", lambda *args: None)
    assert gpu.ws_dq(CAUSAL, torch.bfloat16, CPU, 128, 301, 301) is None
    assert "head dim 64" in gpu.ws_dq(CAUSAL, torch.bfloat16, CPU, 64, 64, 64)
    monkeypatch.setattr(gpu, "WS_DQ", False)
    assert gpu.ws_dq(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "turned off"
    monkeypatch.setattr(gpu, "WS_DQ", None)
    monkeypatch.setattr(gpu, "WS_BACKWARD", False)
    assert gpu.ws_dq(CAUSAL, torch.bfloat16, CPU, 128, 64, 64) == "turned off"
    monkeypatch.setattr(gpu, "WS_BACKWARD", None)


def test_explain_names_the_kernel_where_it_runs(monkeypatch):
    import flashfx
    from flashfx import config

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), dim=-1) @ v

    monkeypatch.setattr(config, "cpu_kernel", "triton")  # the kernels' plan, interpreted
    q, k, v = (torch.randn(2, 4, 256, 128) for _ in range(3))
    assert "warp-specialized" not in flashfx.explain(attend, q, k, v).sites[0].plan
    monkeypatch.setattr(gpu, "ws_backward", lambda *args: None)  # as on an sm_90 GPU
    plan = flashfx.explain(attend, q, k, v).sites[0].plan
    assert "bwd dK/dV: warp-specialized Gluon kernel (128 keys a program in two warpgroups, 64-query blocks" in plan
    assert "bwd dQ" not in plan
    monkeypatch.setattr(gpu, "ws_dq", lambda *args: None)
    plan = flashfx.explain(attend, q, k, v).sites[0].plan
    assert "bwd dQ: warp-specialized Gluon kernel (128 query rows a program in two warpgroups, 64-key blocks" in plan


@gluon_only
def test_row_statistics_are_read_as_rows_of_batch_heads():
    stats = torch.randn(1, 2, 3, 40)  # the forward's log-sum-exp plane [1, B, H, Nq]
    desc = hopper_bwd.describe(stats, [6, 40], [40, 1], [1, hopper_bwd.BLOCK_M])
    assert desc.shape == [6, 40] and desc.strides == [40, 1] and desc.block_shape == [1, 64]
    assert desc.layout.swizzle_byte_width == 0 and desc.layout.element_bitwidth == 32


@gluon_only
@pytest.mark.parametrize("head_dim, causal, heads_first", [(128, 1, False), (128, 0, False), (64, 2, False),
                                                       (64, 1, True)])
def test_the_kernel_compiles_for_sm90_without_spills(head_dim, causal, heads_first):
    # with the row terms held in registers through the products, ptxas spilled 164-352 bytes a
    # thread at head dim 128; they now ride in the accumulators
    from tests.compiled import in_child

    for kernel in ("compile_ws_dkdv", "compile_ws_dq"):
        row = in_child(f"benchmarks.sm90_registers:{kernel}", head_dim, causal, heads_first)
        assert row["spill"] == 0 and row["regs"] == hopper_bwd.MAXNREG, (kernel, row)
        assert row["setmaxnreg"] > 0 and 0 < row["smem"] <= 227 * 1024, (kernel, row)


def _needs_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized dK/dV runs on sm_90")


@pytest.mark.gpu
@pytest.mark.parametrize("shape_q, shape_kv, causal, views", [
    ((2, 4, 1024, 128), (2, 4, 1024, 128), None, False),
    ((2, 4, 1024, 128), (2, 4, 1024, 128), "top_left", False),
    ((3, 2, 300, 128), (3, 2, 300, 128), "top_left", False),       # ragged: partial query blocks and keys
    ((2, 2, 200, 128), (2, 2, 456, 128), "bottom_right", False),   # more keys than queries, diagonal offset
    ((2, 2, 456, 128), (2, 2, 200, 128), None, False),
    ((2, 3, 200, 128), (2, 3, 520, 128), "top_left", False),       # keys no query sees: zero gradients
    ((2, 8, 384, 128), (2, 2, 384, 128), "top_left", False),       # GQA: a program sums 4 query heads
    ((2, 12, 640, 128), None, "top_left", True),                   # strided views of one projection
    ((1, 12, 1024, 64), None, "top_left", True),                   # head dim 64 (GPT-2's layer)
    ((2, 4, 520, 64), (2, 4, 700, 64), None, False),
    ((1, 4, 4, 128), (1, 4, 4, 128), "top_left", False),           # fewer queries than a block
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ws_backward_matches_float64(shape_q, shape_kv, causal, views, dtype):
    _needs_sm90()
    d = shape_q[-1]
    prog = ScoreProgram((ScoreOp("scale", None, 1 / math.sqrt(d)),), causal)
    q, k, v = _case(shape_q, shape_kv or shape_q, dtype, seed=shape_q[1] + shape_q[2], views=views)
    out, stats = gpu.forward(q, k, v, [], prog)
    do = torch.randn_like(q)
    call = gpu._backward_call(do, q, k, v, out, stats, [], prog, (), gpu.tile_plan(q, k, prog))
    assert call.warp_specialized_dkdv and call.warp_specialized_dq == (d == 128)  # dQ: head dim 128 only
    dq, dk, dv, _ = call(do, q, k, v, out, stats, [], None)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    reference_attention(q64, k64, v64, [], prog).backward(do.cpu().double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert _rel(got, want) < 2e-2
    # the same through the op's path, and repeatable: each element is one program's sum
    dq2, dk2, dv2 = gpu.backward(do, q, k, v, out, stats, [], prog)
    assert torch.equal(dk2, dk) and torch.equal(dv2, dv) and torch.equal(dq2, dq)
    # Δ from the Gluon dQ is the generated one's: dK/dV after the generated dQ agree closely
    try:
        gpu.WS_DQ = False
        gen = gpu._backward_call(do, q, k, v, out, stats, [], prog, (), gpu.tile_plan(q, k, prog))
    finally:
        gpu.WS_DQ = None
    assert not gen.warp_specialized_dq
    dq3, dk3, dv3, _ = gen(do, q, k, v, out, stats, [], None)
    assert _rel(dk3, dk.double().cpu()) < 4e-3  # bf16 roundings of sums a few ulps apart
    assert torch.equal(dv3, dv)  # dV does not read Δ
    assert _rel(dq3, q64.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape_q, shape_kv, causal, views", [
    ((2, 12, 1024, 64), None, "top_left", True),                   # GPT-2's layer: generated dQ
    ((2, 8, 384, 128), (2, 2, 384, 128), "top_left", False),       # GQA, the Gluon dQ
    ((2, 2, 200, 128), (2, 2, 456, 128), "bottom_right", False),   # ragged, diagonal offset
])
def test_heads_first_changes_no_bit_of_the_backward(monkeypatch, shape_q, shape_kv, causal, views):
    _needs_sm90()
    d = shape_q[-1]
    prog = ScoreProgram((ScoreOp("scale", None, 1 / math.sqrt(d)),), causal)
    q, k, v = _case(shape_q, shape_kv or shape_q, torch.bfloat16, seed=shape_q[2], views=views)
    out, stats = gpu.forward(q, k, v, [], prog)
    do = torch.randn_like(q)
    # causal and small enough for L2: the default order is heads first
    assert gpu.heads_first("dkdv", q, k, prog) and gpu.heads_first("dq", q, k, prog)
    grads = {}
    for first in (False, True):
        monkeypatch.setattr(gpu, "HEADS_FIRST", first)
        call = gpu._backward_call(do, q, k, v, out, stats, [], prog, (), gpu.tile_plan(q, k, prog))
        assert call.warp_specialized_dkdv and call.warp_specialized_dq == (d == 128)
        grads[first] = call(do, q, k, v, out, stats, [], None)[:3]
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)  # each element is one program's sum, whatever the order
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    reference_attention(q64, k64, v64, [], prog).backward(do.cpu().double())
    for got, want in zip(grads[True], (q64.grad, k64.grad, v64.grad)):
        assert _rel(got, want) < 2e-2


@pytest.mark.gpu
def test_ws_dkdv_is_not_taken_where_it_does_not_apply():
    _needs_sm90()
    prog = ScoreProgram((ScoreOp("scale", None, 128 ** -0.5),), "top_left")
    q, k, v = _case((2, 4, 301, 128), (2, 4, 301, 128), torch.bfloat16, seed=5)
    out, stats = gpu.forward(q, k, v, [], prog)
    do = torch.randn_like(q)
    call = gpu._backward_call(do, q, k, v, out, stats, [], prog, (), gpu.tile_plan(q, k, prog))
    assert not call.warp_specialized_dkdv  # 301 queries: row statistics 1204 bytes apart
    assert call.warp_specialized_dq  # which the dQ kernel reads through pointers
    soft = ScoreProgram((ScoreOp("scale", None, 1 / 30), ScoreOp("tanh"), ScoreOp("scale", None, 30.0)))
    assert "more than a positive scale" in gpu.ws_backward(soft, q.dtype, q.device, 128, 300, 300)
    # the generated dK/dV where it is not taken still matches float64
    dq, dk, dv, _ = call(do, q, k, v, out, stats, [], None)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    reference_attention(q64, k64, v64, [], prog).backward(do.cpu().double())
    assert _rel(dk, k64.grad) < 2e-2 and _rel(dv, v64.grad) < 2e-2 and _rel(dq, q64.grad) < 2e-2


@pytest.mark.gpu
def test_a_models_layers_reuse_their_encoded_descriptors_on_the_gpu(monkeypatch):
    # twelve layers of one shape share each launcher; their tensors keep their addresses from
    # step to step, so after the first step no descriptor is built and encoded again
    _needs_sm90()
    prog = ScoreProgram((ScoreOp("scale", None, 64 ** -0.5),), "top_left")
    layers = [_case((2, 12, 512, 64), (2, 12, 512, 64), torch.bfloat16, seed=i) for i in range(12)]
    dos = [torch.randn_like(q) for q, _, _ in layers]
    import triton

    described = []
    real = hopper_bwd.describe
    monkeypatch.setattr(hopper_bwd, "describe", lambda *a: described.append(1) or real(*a))
    monkeypatch.setattr(gpu, "_recipes", {})  # launchers made afresh, with the counting describe
    counts = []
    for _ in range(4):  # the caching allocator settles into the same addresses within two steps
        for (q, k, v), do in zip(layers, dos):
            out, stats = gpu.forward(q, k, v, [], prog)
            gpu.backward(do, q, k, v, out, stats, [], prog)
        torch.cuda.synchronize()
        counts.append(len(described))
    assert counts[0] > 0, counts
    if triton.__version__.startswith("3.6."):  # where launches go to the compiled launcher
        assert counts[2] == counts[3], counts


@pytest.mark.gpu
def test_autotune_leaves_the_forward_alone_where_the_gluon_forward_runs():
    _needs_sm90()
    prog = ScoreProgram((ScoreOp("scale", None, 128 ** -0.5),), "top_left")
    q, k, v = _case((4, 16, 1024, 128), (4, 16, 1024, 128), torch.bfloat16, seed=3)
    assert gpu._ws_fwd_takes(q, k, v, prog) and gpu._generated_fwd(q, k, v, prog, []) == ()
    q, k, v = _case((4, 16, 1024, 64), (4, 16, 1024, 64), torch.bfloat16, seed=4)  # D=64 rule: N < 4096
    assert not gpu._ws_fwd_takes(q, k, v, prog) and gpu._generated_fwd(q, k, v, prog, []) == ("fwd",)
