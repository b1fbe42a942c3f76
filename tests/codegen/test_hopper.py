"""The warp-specialized Gluon forward (codegen.hopper): which calls it takes, and on an sm_90 GPU
its output, row statistics and the gradients computed from them against float64."""

import math

import pytest
import torch

from flashfx.codegen import hopper
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime import gpu
from tests.reference import reference_attention

SCALE = ScoreProgram((ScoreOp("scale", None, 128 ** -0.5),))
CAUSAL = ScoreProgram((ScoreOp("scale", None, 128 ** -0.5),), "top_left")
CPU = torch.device("cpu")


@pytest.mark.skipif(hopper.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("program, dtype, d, nq, nk, why", [
    (SCALE, torch.float32, 128, 64, 64, "inputs are not fp16/bf16"),
    (SCALE, torch.bfloat16, 96, 64, 64, "head dim 96, measured at 64, 128 only"),
    (ScoreProgram((ScoreOp("scale", None, 0.1), ScoreOp("tanh"))), torch.float16, 128, 64, 64,
     "score program is more than a positive scale and a causal mask"),
    (ScoreProgram((ScoreOp("scale", None, -0.1),)), torch.float16, 128, 64, 64,
     "score program is more than a positive scale and a causal mask"),
    (ScoreProgram((ScoreOp("scale", None, 0.1),), "bottom_right"), torch.float16, 128, 65, 64,
     "bottom-right causal mask with fewer keys than queries (rows that see no key)"),
    (ScoreProgram((ScoreOp("scale", None, 0.1),), "bottom_right"), torch.float16, 128, 64, 65, "not an sm_90 GPU"),
    (CAUSAL, torch.bfloat16, 128, 1000, 1000, "not an sm_90 GPU"),
])
def test_supports_names_why_a_call_takes_the_generated_forward(program, dtype, d, nq, nk, why):
    assert hopper.supports(program, dtype, CPU, d, nq, nk, 8) == why


def test_the_interpreter_and_the_switch_keep_the_generated_forward(monkeypatch):
    monkeypatch.setattr(gpu.tiling, "interpreting", lambda: True)
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) == "Triton interpreter"
    monkeypatch.setattr(gpu.tiling, "interpreting", lambda: False)
    monkeypatch.setattr(hopper, "supports", lambda *args: None)  # as on an sm_90 GPU
    monkeypatch.setattr(gpu, "TMA", False)
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) == "descriptor reads turned off (gpu.TMA, FLASHFX_TMA=0)"
    monkeypatch.setattr(gpu, "TMA", True)
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) is None
    monkeypatch.setattr(gpu, "WS_FORWARD", False)
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) == "turned off"
    monkeypatch.setattr(gpu, "WS_FORWARD", None)
    monkeypatch.setenv("FLASHFX_WS_FORWARD", "0")
    assert gpu.ws_forward(CAUSAL, torch.bfloat16, CPU, 128, 64, 64, 8) == "turned off"


def test_explain_names_the_kernel_where_it_runs(monkeypatch):
    import flashfx
    from flashfx import config

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), dim=-1) @ v

    monkeypatch.setattr(config, "cpu_kernel", "triton")  # the kernels' plan, interpreted
    q, k, v = (torch.randn(2, 4, 256, 128) for _ in range(3))
    assert "warp-specialized" not in flashfx.explain(attend, q, k, v).sites[0].plan  # the interpreter
    monkeypatch.setattr(gpu, "ws_forward", lambda *args: None)  # as on an sm_90 GPU
    plan = flashfx.explain(attend, q, k, v).sites[0].plan
    assert "fwd: warp-specialized Gluon kernel (persistent, one program an SM; tiles of 128 query rows" in plan, plan


@pytest.mark.skipif(hopper.gluon is None, reason="this Triton has no Gluon")
def test_descriptors_read_swizzled_boxes_of_the_strided_view():
    qkv = torch.randn(2, 40, 3 * 4 * 128, dtype=torch.bfloat16)
    q = qkv[..., :512].view(2, 40, 4, 128).transpose(1, 2)  # [B, H, N, D], rows 3·H·D apart
    shape, strides = gpu._geometry(q)
    desc = hopper.describe(q, shape, strides, [1, 1, 64, 128])
    assert desc.shape == [2, 4, 40, 128] and desc.strides == [q.stride(0), 128, 1536, 1]
    assert desc.block_shape == [1, 1, 64, 128] and desc.layout.swizzle_byte_width == 128


def test_head_dim_64_takes_the_kernel_where_it_was_measured_faster():
    causal64 = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    plain64 = ScoreProgram((ScoreOp("scale", None, 0.125),))
    assert hopper.d64_rule(causal64, 4096, 2 * 12, 132) is None  # GPT-2's layer at seq 4096: 2.9 pairs an SM
    assert "without a causal mask" in hopper.d64_rule(plain64, 4096, 2 * 12, 132)
    assert "fewer than 4096 queries" in hopper.d64_rule(causal64, 1024, 8 * 12, 132)  # GPT-2 at seq 1024
    assert "15.5 pairs of query tiles an SM" in hopper.d64_rule(causal64, 4096, 4 * 32, 132)
    assert hopper.d64_rule(causal64, 4096, 33, 132) is None and hopper.d64_rule(causal64, 4096, 34, 132)  # 4 an SM


def test_schedule_pairs_each_heads_query_tiles_one_program_an_sm():
    # (programs, (items, pairs a head, tiles a head)); a tile is 128 query rows
    assert hopper.schedule(256, 1024, 132) == (132, (1024, 4, 8))
    assert hopper.schedule(24, 640, 132) == (72, (72, 3, 5))  # 5 tiles: the middle one alone
    assert hopper.schedule(2, 40, 132) == (2, (2, 1, 1))


@pytest.mark.skipif(hopper.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("head_dim, causal", [(128, 1), (64, 1), (128, 0)])
def test_the_kernel_compiles_for_sm90_without_spills(head_dim, causal):
    # the installed Triton's Gluon and ptxas, no GPU: a Triton whose Gluon renamed or dropped what
    # the kernel calls fails here, not on a user's H100
    from tests.compiled import in_child

    row = in_child("benchmarks.sm90_registers:compile_ws_forward", head_dim, causal)
    assert row["spill"] == 0 and row["regs"] == hopper.MAXNREG, row
    assert row["setmaxnreg"] > 0 and 0 < row["smem"] <= 227 * 1024, row


def _case(shape_q, shape_kv, dtype, seed, views=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, H, Nq, D = shape_q
    if views:  # q, k, v as a model's one projection makes them
        qkv = torch.randn(B, Nq, 3 * H * D, device="cuda", dtype=dtype, generator=g)
        return [x.view(B, Nq, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2)]
    q = torch.randn(shape_q, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(shape_kv, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return [q, k, v]


def _rel(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


@pytest.mark.gpu
# grids of at least half an H200's SMs in query blocks: smaller ones split the key range and
# take the generated forward (plan.kv_splits)
@pytest.mark.parametrize("shape_q, shape_kv, causal, views", [
    ((4, 8, 1024, 128), (4, 8, 1024, 128), None, False),
    ((4, 8, 1024, 128), (4, 8, 1024, 128), "top_left", False),
    ((8, 4, 300, 128), (8, 4, 300, 128), "top_left", False),      # ragged: bounds masks, clipped stores
    ((8, 8, 200, 128), (8, 8, 456, 128), "bottom_right", False),  # cross lengths, diagonal offset
    ((8, 8, 456, 128), (8, 8, 200, 128), None, False),
    ((16, 8, 40, 128), (16, 8, 40, 128), "top_left", False),      # one block, half a program
    ((4, 8, 384, 128), (4, 2, 384, 128), "top_left", False),      # GQA, 4 query heads a K/V head
    ((2, 12, 640, 128), None, "top_left", True),                  # strided views of one projection
    # more pairs of query tiles than SMs, so that programs walk several; odd tile counts a head
    ((32, 8, 512, 128), (32, 8, 512, 128), "top_left", False),
    ((32, 8, 384, 128), (32, 8, 384, 128), None, False),
    # head dim 64: causal, at least 4096 queries, small grids (GPT-2's layer is one)
    ((1, 12, 4096, 64), None, "top_left", True),
    ((1, 4, 4096, 64), (1, 4, 4200, 64), "bottom_right", False),
    ((1, 4, 4160, 64), (1, 2, 4160, 64), "top_left", False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ws_forward_and_backward_match_float64(shape_q, shape_kv, causal, views, dtype):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized forward runs on sm_90")
    d = shape_q[-1]
    prog = ScoreProgram((ScoreOp("scale", None, 1 / math.sqrt(d)),), causal)
    q, k, v = _case(shape_q, shape_kv or shape_q, dtype, seed=len(shape_q) + shape_q[2], views=views)
    tiles = gpu.tile_plan(q, k, prog)
    call = gpu._forward_call(q, k, v, [], prog, tiles)
    assert call.warp_specialized
    out, stats = call(q, k, v, [], None)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, [], prog)
    assert _rel(out, ref) < 1e-2
    # the statistics the backward reads: one plane, the log-sum-exp in natural-log units
    group = q.shape[1] // k.shape[1]
    s = (q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2)).detach() / math.sqrt(d)
    if causal:
        nq, nk = s.shape[-2:]
        diag = 0 if causal == "top_left" else nk - nq
        s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + diag, float("-inf"))
    assert stats.shape == (1, *q.shape[:3])
    assert (stats[0].double().cpu() - torch.logsumexp(s, -1)).abs().max().item() < 2e-2
    # the same forward through the op's path, then the backward from its statistics
    out2, stats2 = gpu.forward(q, k, v, [], prog)
    assert torch.equal(out2, out) and torch.equal(stats2, stats)
    do = torch.randn_like(q)
    dq, dk, dv = gpu.backward(do, q, k, v, out2, stats2, [], prog)
    ref.backward(do.cpu().double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert _rel(got, want) < 2e-2


@pytest.mark.gpu
def test_ws_forward_is_not_taken_where_it_does_not_apply():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized forward runs on sm_90")
    q, k, v = _case((8, 8, 256, 128), (8, 8, 256, 128), torch.bfloat16, seed=3)
    soft = ScoreProgram((ScoreOp("scale", None, 1 / 30), ScoreOp("tanh"), ScoreOp("scale", None, 30.0)))
    assert not gpu._forward_call(q, k, v, [], soft, gpu.tile_plan(q, k, soft)).warp_specialized
    q96 = torch.randn(8, 8, 256, 96, device="cuda", dtype=torch.bfloat16)
    assert not gpu._forward_call(q96, q96, q96, [], SCALE, gpu.tile_plan(q96, q96, SCALE)).warp_specialized
    # head dim 64: without a mask, at fewer than 4096 queries, on more than 4 pairs of tiles an SM
    causal64 = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    q64 = torch.randn(2, 12, 4096, 64, device="cuda", dtype=torch.bfloat16)
    assert not gpu._forward_call(q64, q64, q64, [], SCALE, gpu.tile_plan(q64, q64, SCALE)).warp_specialized
    assert gpu._forward_call(q64, q64, q64, [], causal64, gpu.tile_plan(q64, q64, causal64)).warp_specialized
    assert "fewer than 4096 queries" in gpu.ws_forward(causal64, q64.dtype, q64.device, 64, 2048, 2048, 24)
    assert "pairs of query tiles an SM" in gpu.ws_forward(causal64, q64.dtype, q64.device, 64, 4096, 4096, 128)
    odd = torch.randn(8, 8, 256, 130, device="cuda", dtype=torch.bfloat16)[..., :128]  # rows 260 B apart
    assert not gpu._forward_call(odd, odd, odd, [], SCALE, gpu.tile_plan(odd, odd, SCALE)).warp_specialized
