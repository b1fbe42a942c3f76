"""The generated Triton kernels against a float64 reference, forward and backward.

Without a GPU they run under TRITON_INTERPRET=1 on small shapes (tests/conftest.py sets it);
the `gpu` tests run the same checks on CUDA at larger shapes and in bf16.
"""

import ast
import dataclasses

import pytest
import torch

from flashfx.codegen import attention as codegen
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.planner.plan import KernelTiles
from flashfx.runtime import gpu
from tests.reference import reference_attention

SCALE = ScoreOp("scale", None, 0.3)
PROGRAMS = {
    "scale": ScoreProgram((SCALE,)),
    "causal": ScoreProgram((SCALE,), "top_left"),
    "bottom_right": ScoreProgram((SCALE,), "bottom_right"),
    "bias_keep": ScoreProgram((SCALE, ScoreOp("bias", 0), ScoreOp("keep", 1, float("-inf")))),
    "drop_causal": ScoreProgram((ScoreOp("drop", 1, float("-inf")), ScoreOp("bias", 0), SCALE), "top_left"),
}
# programs whose scale is applied late (_lazy_scale), or must not be
LATE_SCALE = {
    "scale_keep": ScoreProgram((SCALE, ScoreOp("keep", 1, float("-inf"))), "bottom_right"),
    "neg_scale_causal": ScoreProgram((ScoreOp("scale", None, -0.3),), "top_left"),
}
# tolerances on ‖x − ref‖ / ‖ref‖, tied to the input precision
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _operands(B, H, Nq, Nk, device, gen):
    bias = torch.randn(1, H, Nq, Nk, generator=gen).to(device).expand(B, H, Nq, Nk)
    keep = (torch.rand(B, 1, 1, Nk, generator=gen) > 0.25).to(device).expand(B, H, Nq, Nk)
    return [bias, keep]


def _run(B, H, Hk, Nq, Nk, D, dtype, prog, device, seed=0, dkdv: KernelTiles | None = None):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    # q, k, v made non-contiguous on purpose: [B, N, H, D] storage seen as [B, H, N, D]
    q = randn(B, Nq, H, D).transpose(1, 2)
    k = randn(B, Nk, Hk, D).transpose(1, 2)
    v = randn(B, Nk, Hk, D).transpose(1, 2)
    xs = _operands(B, H, Nq, Nk, device, gen)[: prog.num_operands]
    out, stats = gpu.forward(q, k, v, xs, prog)
    dout = randn(B, H, Nq, D)
    tiles = None if dkdv is None else dataclasses.replace(gpu.tile_plan(q, k, prog), bwd_dkdv=dkdv)
    dq, dk, dv = gpu.backward(dout, q, k, v, out, stats, xs, prog, tiles=tiles)

    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, [x.cpu() for x in xs], prog)
    ref.backward(dout.double().cpu())
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), name
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("prog", PROGRAMS, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 2, 33, 33, 16), (2, 4, 2, 40, 70, 24), (1, 2, 1, 50, 37, 32)],
                         ids=["square-odd", "gqa-cross", "mqa-nq>nk"])
def test_interpreted_kernels_match_reference(monkeypatch, prog, shape):
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    _run(*shape, torch.float32, PROGRAMS[prog], "cpu")


@pytest.mark.parametrize("prog", LATE_SCALE, ids=str)
def test_interpreted_late_scale(prog):
    # an operand mask with the late scale (its rows can see nothing at all), and a negative
    # scale, which keeps the per-score path
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    _run(2, 4, 2, 40, 70, 24, torch.float32, LATE_SCALE[prog], "cpu")
    _run(1, 2, 1, 50, 37, 32, torch.float32, LATE_SCALE[prog], "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("prog", LATE_SCALE, ids=str)
def test_gpu_late_scale(prog, D):
    _run(2, 4, 2, 300, 257, D, torch.bfloat16, LATE_SCALE[prog], "cuda")


@pytest.mark.parametrize("D", [16, 80, 192])
def test_interpreted_kernels_fp16(D):
    # bf16 is not tested here: the Triton 3.9 interpreter's tl.dot mis-reads bf16 inputs
    # (loads and stores are right); bf16 runs in the gpu tests.
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    _run(1, 2, 1, 45, 29, D, torch.float16, PROGRAMS["bias_keep"], "cpu")


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "nested"])
@pytest.mark.parametrize("prog", ["causal", "bottom_right", "drop_causal"])
def test_interpreted_tile_reads_and_dkdv_loops(monkeypatch, prog, tma, flat):
    # descriptor reads zero-fill outside the tensor (ragged N, padded head dim) where pointer
    # reads mask; dK/dV's group loop is one flattened loop or nested loops: all give one result
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    monkeypatch.setattr(gpu, "TMA", tma)
    monkeypatch.setattr(gpu, "FLAT_DKDV", flat)
    _run(2, 4, 2, 40, 70, 24, torch.float32, PROGRAMS[prog], "cpu")


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("prog", [*PROGRAMS, *LATE_SCALE])
def test_interpreted_dkdv_keys_down(prog, tiles):
    # dK/dV with [BN, BM] tiles (K·Qᵀ): masks, operands, dropout and row statistics read
    # along the other axis, each with its own ragged edge
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    program = {**PROGRAMS, **LATE_SCALE}[prog]
    _run(2, 4, 2, 40, 70, 24, torch.float32, program, "cpu", dkdv=KernelTiles(*tiles, 4, 1, 0, keys_down=True))


@pytest.mark.parametrize("keys_down", [True, False], ids=["keys_down", "queries_down"])
@pytest.mark.parametrize("prog", ["bottom_right", "causal", "scale_keep"])
def test_interpreted_dkdv_full_blocks_after_rows_that_see_nothing(prog, keys_down):
    # Nq > Nk, bottom-right: the first 30 rows see no key (-inf statistics, zero gradients),
    # and each key block has query blocks past the diagonal that see all of it, which dK/dV
    # runs without bounds masks, and, under a program that masks nothing by value, without the
    # fix-up for -inf statistics; with an operand mask (scale_keep) those rows keep it
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    program = {**PROGRAMS, **LATE_SCALE}[prog]
    _run(1, 2, 1, 100, 70, 16, torch.float32, program, "cpu", dkdv=KernelTiles(16, 16, 4, 1, 0, keys_down=keys_down))


@pytest.mark.parametrize("keys_down", [True, False], ids=["keys_down", "queries_down"])
def test_interpreted_dkdv_rows_an_operand_hides_entirely(keys_down):
    # rows 60..69 see no key through the keep mask, inside query blocks that see the whole
    # first key block structurally: their -inf statistics still need the fix-up there
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    gen = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(1, 100, 2, 16, generator=gen).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(1, 70, 1, 16, generator=gen).transpose(1, 2) for _ in range(2))
    keep = torch.rand(1, 1, 100, 70, generator=gen) > 0.25
    keep[..., 60:70, :] = False
    # scale_keep reads operand 1 (operand 0, a bias, is unused by it)
    prog = LATE_SCALE["scale_keep"]
    xs = [torch.randn(1, 2, 100, 70, generator=gen), keep.expand(1, 2, 100, 70)]
    tiles = dataclasses.replace(gpu.tile_plan(q, k, prog), bwd_dkdv=KernelTiles(16, 16, 4, 1, 0, keys_down=keys_down))
    out, stats = gpu.forward(q, k, v, xs, prog)
    dq, dk, dv = gpu.backward(dout, q, k, v, out, stats, xs, prog, tiles=tiles)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, xs, prog)
    ref.backward(dout.double())
    for name, got, want in (("out", out, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert torch.isfinite(got).all(), name
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 3)], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("prog", [*PROGRAMS, "scale_keep"])
def test_gpu_dkdv_keys_down(prog, D, tiles):
    program = {**PROGRAMS, **LATE_SCALE}[prog]
    _run(2, 4, 2, 300, 257, D, torch.bfloat16, program, "cuda", dkdv=KernelTiles(*tiles, 0, keys_down=True))


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("prog", ["scale", "causal", "bottom_right", "bias_keep", "drop_causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 40, 70, 24), (1, 2, 1, 1, 90, 16), (1, 2, 2, 5, 33, 32)],
                         ids=["gqa-cross", "one-query", "few-queries"])
def test_interpreted_split_key_range(monkeypatch, prog, shape, splits):
    # the forward split into parts of the key range, merged by the combine kernel: parts that
    # see no key (causal rows, short ranges) must weigh nothing; the backward uses its stats
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    if shape[3] == 1 and PROGRAMS[prog].causal == "top_left":
        pytest.skip("one query under a top-left diagonal sees one key: its gradients are all 0")
    monkeypatch.setattr(gpu, "FWD_SPLITS", splits)
    _run(*shape, torch.float32, PROGRAMS[prog], "cpu")


@pytest.mark.parametrize("prog", ["scale", "causal", "bottom_right", "bias_keep", "drop_causal"])
@pytest.mark.parametrize("shape, pack, splits", [
    ((2, 6, 2, 5, 37, 16), None, 1),   # a group's 15 rows in one 16-row tile
    ((1, 8, 2, 7, 50, 16), None, 2),   # 28 rows: the second tile holds heads 2 and 3 of a group
    ((1, 4, 2, 20, 45, 32), True, 1),  # packing forced at 20 queries: tiles straddle heads
    ((1, 4, 2, 20, 45, 32), False, 1),
], ids=["one-tile", "two-tiles-split", "forced", "off"])
def test_interpreted_gqa_group_packed_in_tiles(monkeypatch, prog, shape, pack, splits):
    # the forward's rows are (query head, query) pairs of one K/V head's group: per-head
    # operands, dropout's per-score mask and the causal range must follow each row's head
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu tests")
    if prog == "drop_causal" and shape[3] < 8:
        pytest.skip("a top-left diagonal and the drop mask leave these rows one key each: dQ is all 0")
    monkeypatch.setattr(gpu, "GQA_PACK", pack)
    monkeypatch.setattr(gpu, "FWD_SPLITS", splits)
    assert gpu.packs(shape[1] // shape[2], shape[3], 16) == (pack is not False)
    _run(*shape, torch.float32, PROGRAMS[prog], "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("prog", ["bottom_right", "bias_keep", "drop_causal"])
@pytest.mark.parametrize("shape", [(2, 32, 8, 1, 3000, 128), (2, 16, 4, 16, 1000, 64), (1, 8, 2, 50, 700, 128)],
                         ids=["decode", "16-queries", "straddling"])
def test_gpu_gqa_group_packed_in_tiles(monkeypatch, prog, shape):
    if shape[3] == 50:
        monkeypatch.setattr(gpu, "GQA_PACK", True)
    if shape[3] == 1 and PROGRAMS[prog].causal == "top_left":
        pytest.skip("one query under a top-left diagonal sees one key: its gradients are all 0")
    _run(*shape, torch.bfloat16, PROGRAMS[prog], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("prog", ["causal", "bottom_right", "bias_keep", "drop_causal"])
def test_gpu_split_key_range(monkeypatch, prog, splits):
    monkeypatch.setattr(gpu, "FWD_SPLITS", splits)
    if PROGRAMS[prog].causal != "top_left":  # one query under a top-left diagonal: gradients all 0
        _run(2, 8, 2, 1, 1000, 128, torch.bfloat16, PROGRAMS[prog], "cuda")
    _run(1, 4, 4, 70, 513, 64, torch.float16, PROGRAMS[prog], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "nested"])
@pytest.mark.parametrize("prog", ["causal", "bias_keep"])
def test_gpu_tile_reads_and_dkdv_loops(monkeypatch, prog, tma, flat):
    monkeypatch.setattr(gpu, "TMA", tma)
    monkeypatch.setattr(gpu, "FLAT_DKDV", flat)
    _run(2, 8, 2, 300, 257, 128, torch.bfloat16, PROGRAMS[prog], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [16, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("prog", PROGRAMS, ids=str)
def test_gpu_kernels_match_reference(dtype, D, prog):
    _run(2, 4, 2, 300, 257, D, dtype, PROGRAMS[prog], "cuda")


def test_emitted_source_is_python_and_inlines_the_program():
    prog = PROGRAMS["drop_causal"]
    src = codegen.emit(prog)
    ast.parse(src)
    assert str(prog) in src  # the header names the program it was made for
    for kernel in ("_attn_fwd", "_attn_fwd_combine", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert f"def {kernel}(" in src
    assert "def _attn_bwd_delta(" not in src  # Δ comes from the dQ kernel
    # two operands: pointers X0, X1 and their strides; the mask is applied with tl.where
    assert "X0, X1," in src and "sx1_n" in src and "tl.where(x0, float('-inf'), s)" in src
    # no N×N buffer: the kernels only store O, the two row statistics (from the forward, or
    # from the combine of a split forward, whose parts store [BM, D] partials and their two row
    # statistics), Δ, dQ, dK, dV
    assert src.count("tl.store(") == 7 + 3 + 3


def test_late_scale_is_exactly_the_one_plane_programs():
    # the kernels apply the scale late and load one plane of statistics for the same programs
    # the op allocates one plane for
    programs = [*PROGRAMS.values(), *LATE_SCALE.values(), ScoreProgram((ScoreOp("keep", 0, float("-inf")), SCALE)),
                ScoreProgram((SCALE, ScoreOp("keep", 0, -1e4))), ScoreProgram()]
    for prog in programs:
        late = codegen._lazy_scale(*codegen._fold_log2e(prog)) is not None
        assert late == (prog.stats_planes == 1), prog
    assert {p.stats_planes for p in programs} == {1, 2}


def test_scale_only_program_folds_log2e():
    src = codegen.emit(PROGRAMS["scale"])
    c = 0.3 * codegen.LOG2E
    fwd = src.split("def _attn_fwd(")[1].split("def _attn_fwd_combine")[0]
    assert "* LOG2E" not in fwd
    # the scale is applied late: to the row max, and inside the exponent as one multiply-add
    assert f"tl.max(s, 1) * {c!r}" in fwd and f"p = tl.exp2(s * {c!r} - m_use[:, None])" in fwd
    assert "s = s *" not in fwd
    # the backward has no per-score derivative lines; dK and dQ are scaled once at the end
    for kernel, per_query in (("_attn_bwd_dkdv", ("[None, :]", "[:, None]")), ("_attn_bwd_dq", ("[:, None]",))):
        body = src.split(f"def {kernel}(")[1].split("@triton.jit")[0]
        for axis in per_query:  # dK/dV: keys down the rows, and queries down
            assert f"p = tl.exp2(s * {c!r} - lse{axis})" in body
        assert "g = g *" not in body and body.count(f"* {0.3!r}  # the scale's derivative") == 1
    # a negative scale does not commute with the row max: applied per score as written
    src = codegen.emit(LATE_SCALE["neg_scale_causal"])
    assert f"s = s * {-c!r}" in src and "lse[" not in src
    # a bias after the scale: scores stay in natural units (a finfo.min bias must not overflow
    # when scaled), and only differences from the row max are scaled by log2(e)
    src = codegen.emit(PROGRAMS["bias_keep"])
    assert "p = tl.exp2((s - m_use[:, None]) * LOG2E)" in src


def test_kernel_cache_reuses_the_module(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    text = ScoreProgram((ScoreOp("scale", None, 0.123),)).encode()
    a = codegen.load(text)
    assert codegen.load(text) is a
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 1
