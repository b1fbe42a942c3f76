"""The CPU chunked path (flashfx.runtime.cpu) against the float64 reference, and its memory.

Explicit small chunks (16 queries × 24 keys) on sequence lengths that are not multiples of
them, so every case runs many blocks, ragged last chunks, and causal blocks that are skipped,
crossed by the diagonal, or wholly visible. Imports `tests.reference` through the package
`tests/__init__.py` (pytest's rootdir-relative import; run pytest from the repository root).
"""

import pytest
import torch

from flashfx import scoreops
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime import cpu
from tests.reference import reference_attention

CHUNKS = dict(q_chunk=16, k_chunk=24)
SCALE = ScoreOp("scale", None, 0.3)
# operand 0: float bias [1, H, Nq, Nk]; 1: padding keep-mask [B, 1, 1, Nk]; 2: drop-mask [1, 1, Nq, Nk]
PROGRAMS = {
    "scale": ScoreProgram((SCALE,)),
    "top_left": ScoreProgram((SCALE,), "top_left"),
    "bottom_right": ScoreProgram((SCALE,), "bottom_right"),
    "bias_pad": ScoreProgram((SCALE, ScoreOp("bias", 0), ScoreOp("keep", 1, float("-inf")))),
    "drop_bias_causal": ScoreProgram((ScoreOp("drop", 2, float("-inf")), ScoreOp("bias", 0), SCALE), "top_left"),
    "softcap_finite_fill": ScoreProgram(
        (ScoreOp("scale", None, 1 / 4), ScoreOp("tanh"), ScoreOp("scale", None, 4.0), ScoreOp("drop", 2, -1e4)),
        "bottom_right",
    ),
}
SHAPES = {  # (B, H, Hk, Nq, Nk, D)
    "square": (2, 2, 2, 37, 37, 16),
    "gqa-nq<nk-d80": (1, 4, 2, 29, 53, 80),
    "mqa-nq>nk": (2, 4, 1, 50, 31, 16),
}
# ‖got - ref‖ / ‖ref‖, tied to the input precision (bf16: inputs exact, out/grads rounded to bf16)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(B, H, Hk, Nq, Nk, D, dtype, seed=0, contiguous=False):
    """q, k, v, dout and the three operands as expanded 4-D views; fresh seeded randoms."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if contiguous:
        q, k, v = randn(B, H, Nq, D), randn(B, Hk, Nk, D), randn(B, Hk, Nk, D)
    else:  # [B, N, H, D] storage seen as [B, H, N, D], as models produce it
        q = randn(B, Nq, H, D).transpose(1, 2)
        k, v = randn(B, Nk, Hk, D).transpose(1, 2), randn(B, Nk, Hk, D).transpose(1, 2)
    dout = randn(B, H, Nq, D)
    xs = [
        randn(1, H, Nq, Nk).expand(B, H, Nq, Nk),  # relative-position-like bias
        (torch.rand(B, 1, 1, Nk, generator=gen) > 0.2).expand(B, H, Nq, Nk),  # padding: True = keep
        (torch.rand(1, 1, Nq, Nk, generator=gen) > 0.8).expand(B, H, Nq, Nk),  # True = drop
    ]
    return q, k, v, dout, xs


def _reference(q, k, v, dout, xs, program):
    """(out, dq, dk, dv) of the float64 reference, by torch.autograd."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, xs, program)
    out.backward(dout.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _check(got, want, tol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} is not finite"
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < tol, f"{name}: relative error {err:.1e} > {tol:.0e}"


def _run(q, k, v, dout, xs, program, **chunks):
    out, stats = cpu.attention_forward(q, k, v, xs, program, **chunks)
    grads = cpu.attention_backward(dout, q, k, v, out, stats, xs, program, **chunks)
    return (out, *grads), stats.sum(0)  # the log-sum-exp: row max + log Σ exp(s - max)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prog", PROGRAMS)
def test_matches_reference(prog, shape, dtype):
    q, k, v, dout, xs = _inputs(*SHAPES[shape], dtype)
    program = PROGRAMS[prog]
    (out, dq, dk, dv), lse = _run(q, k, v, dout, xs, program, **CHUNKS)

    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == cpu.compute_dtype(dtype)
    # the layouts the custom op's fake implementation promises: the inputs' strides
    assert (out.stride(), dq.stride(), dk.stride(), dv.stride()) == (q.stride(), q.stride(), k.stride(), v.stride())
    _check((out, dq, dk, dv), _reference(q, k, v, dout, xs, program), TOL[dtype])


@pytest.mark.parametrize("prog", ["bias_pad", "drop_bias_causal"])
def test_lse_is_the_logsumexp_of_the_final_scores(prog):
    B, H, Hk, Nq, Nk, D = SHAPES["mqa-nq>nk"]
    q, k, v, _, xs = _inputs(B, H, Hk, Nq, Nk, D, torch.float64)
    program = PROGRAMS[prog]
    _, stats = cpu.attention_forward(q, k, v, xs, program, **CHUNKS)
    lse = stats.sum(0)
    s = q @ k.repeat_interleave(H // Hk, 1).transpose(-2, -1)
    s = scoreops.apply_torch(program, s, xs, slice(None), slice(None))
    if program.causal == "top_left":
        s = s.masked_fill(~torch.ones(Nq, Nk, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_default_chunks_match_reference(contiguous):
    """No explicit chunks: the default rule's single block must agree too."""
    q, k, v, dout, xs = _inputs(*SHAPES["gqa-nq<nk-d80"], torch.float32, seed=1, contiguous=contiguous)
    program = PROGRAMS["drop_bias_causal"]
    got, _ = _run(q, k, v, dout, xs, program)
    _check(got, _reference(q, k, v, dout, xs, program), TOL[torch.float32])


def test_operands_not_expanded_and_fp64_bias_with_fp32_inputs():
    """Operands that only broadcast (not expanded views), and an fp64 bias that must not
    promote the fp32 computation."""
    B, H, Hk, Nq, Nk, D = SHAPES["mqa-nq>nk"]
    q, k, v, dout, _ = _inputs(B, H, Hk, Nq, Nk, D, torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, H, 1, Nk, generator=gen, dtype=torch.float64), torch.rand(B, 1, 1, Nk, generator=gen) > 0.3]
    program = PROGRAMS["bias_pad"]
    got, _ = _run(q, k, v, dout, xs, program, **CHUNKS)
    assert got[0].dtype == torch.float32
    _check(got, _reference(q, k, v, dout, xs, program), TOL[torch.float32])


def _dead_row_cases(B, H, Nq, Nk):
    """(name, program, operands, bool [B, H, Nq] of the rows that see no key)."""
    none = torch.zeros(B, H, Nq, dtype=torch.bool)
    # bottom_right with Nq > Nk: the first Nq - Nk queries precede every key
    br = none.clone()
    br[:, :, : Nq - Nk] = True
    # a keep-mask whose rows 3 and 17 keep nothing
    keep = torch.ones(1, 1, Nq, Nk, dtype=torch.bool)
    keep[..., [3, 17], :] = False
    rows = none.clone()
    rows[:, :, [3, 17]] = True
    # a padding mask that leaves batch element 1 without any key
    pad = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    pad[1] = False
    batch = none.clone()
    batch[1] = True
    keep_prog = ScoreProgram((SCALE, ScoreOp("keep", 0, float("-inf"))))
    return [
        ("bottom_right", ScoreProgram((SCALE,), "bottom_right"), [], br),
        ("masked_rows", keep_prog, [keep.expand(B, H, Nq, Nk)], rows),
        ("masked_batch", keep_prog, [pad.expand(B, H, Nq, Nk)], batch),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(3), ids=["bottom_right", "masked_rows", "masked_batch"])
def test_fully_masked_rows_give_zero_and_no_nan(case, dtype):
    B, H, Hk, Nq, Nk, D = 2, 4, 2, 40, 21, 16
    q, k, v, dout, _ = _inputs(B, H, Hk, Nq, Nk, D, dtype, seed=4)
    _, program, xs, dead = _dead_row_cases(B, H, Nq, Nk)[case]
    (out, dq, dk, dv), lse = _run(q, k, v, dout, xs, program, **CHUNKS)

    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert not torch.isnan(lse).any()
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all() and (dq[dead] == 0).all()
    assert torch.isfinite(lse[~dead]).all()
    _check((out, dq, dk, dv), _reference(q, k, v, dout, xs, program), TOL[dtype])


def test_chunk_size_does_not_change_the_result():
    q, k, v, dout, xs = _inputs(*SHAPES["square"], torch.float64, seed=5)
    program = PROGRAMS["drop_bias_causal"]
    whole, lse_whole = _run(q, k, v, dout, xs, program, q_chunk=64, k_chunk=64)
    for q_chunk, k_chunk in [(1, 7), (5, 37), (37, 1), (13, 13)]:
        got, lse = _run(q, k, v, dout, xs, program, q_chunk=q_chunk, k_chunk=k_chunk)
        torch.testing.assert_close(lse, lse_whole, rtol=1e-12, atol=1e-12)
        for g, w in zip(got, whole):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal_skips_blocks_above_and_masks_only_blocks_on_the_diagonal(monkeypatch, causal):
    """Count the blocks evaluated and the causal masks built against the diagonal's geometry."""
    B, H, Hk, Nq, Nk, D = 1, 2, 1, 50, 70, 16
    q, k, v, dout, _ = _inputs(B, H, Hk, Nq, Nk, D, torch.float32, seed=6)
    program = ScoreProgram((SCALE,), causal)
    diag = 0 if causal == "top_left" else Nk - Nq
    cq, ck = CHUNKS["q_chunk"], CHUNKS["k_chunk"]
    blocks = masks = 0
    for r0 in range(0, Nq, cq):
        last_row = min(r0 + cq, Nq) - 1
        for c0 in range(0, Nk, ck):
            last_col = min(c0 + ck, Nk) - 1
            blocks += c0 <= last_row + diag  # some key of the block is visible to some row
            masks += c0 <= last_row + diag and last_col > r0 + diag  # ... and some is not

    calls = {"blocks": 0, "masks": 0}
    apply_torch, causal_mask = scoreops.apply_torch, cpu._causal_mask

    def counting_apply(*args):
        calls["blocks"] += 1
        return apply_torch(*args)

    def counting_mask(*args):
        mask = causal_mask(*args)
        calls["masks"] += mask is not None
        return mask

    monkeypatch.setattr(scoreops, "apply_torch", counting_apply)
    monkeypatch.setattr(cpu, "_causal_mask", counting_mask)
    out, stats = cpu.attention_forward(q, k, v, [], program, **CHUNKS)
    assert calls == {"blocks": blocks, "masks": masks}
    cpu.attention_backward(dout, q, k, v, out, stats, [], program, **CHUNKS)
    assert calls == {"blocks": 2 * blocks, "masks": 2 * masks}
    assert blocks < len(range(0, Nq, cq)) * len(range(0, Nk, ck))  # something was skipped


def test_default_chunk_rule():
    for bh, nq, nk in [(1, 16384, 16384), (32, 4096, 4096), (8, 1, 32768), (8, 4096, 77), (64, 1000, 1000), (1, 100, 30)]:
        cq, ck = cpu.default_chunk_sizes(bh, nq, nk)
        assert 1 <= cq <= min(nq, cpu.MAX_Q_CHUNK) and 1 <= ck <= min(nk, cpu.MAX_K_CHUNK)
        assert bh * cq * ck <= cpu.SCORE_BLOCK_BUDGET
    assert cpu.default_chunk_sizes(1, 16384, 16384) == (512, 1024)
    assert cpu.default_chunk_sizes(32, 4096, 4096) == (128, 128)
    assert cpu.default_chunk_sizes(8, 1, 32768) == (1, 4096)  # decoding: keys get the budget
    assert cpu.default_chunk_sizes(8, 4096, 77) == (848, 77)  # short keys: queries get it
    # past the budget only where the MIN_CHUNK floor must win
    assert cpu.default_chunk_sizes(1 << 14, 4096, 4096) == (cpu.MIN_CHUNK, cpu.MIN_CHUNK)


# --- memory --------------------------------------------------------------------------------------


def _peak_live_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed while fn() runs, from the profiler's
    chronological record of every CPU allocation (+) and free (-)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_memory_is_linear_in_n():
    """Forward + backward: peak extra memory is O(N·D + chunk²), not O(N²) — an absolute
    bound, linear growth from N to 2N, and the same measure catching eager's N×N buffers."""
    D, cq, ck = 16, 64, 128
    program = ScoreProgram((SCALE,), "top_left")
    peaks = {}
    for n in (1024, 2048):
        q, k, v, dout, _ = _inputs(1, 1, 1, n, n, D, torch.float32, seed=7, contiguous=True)

        def chunked():
            out, stats = cpu.attention_forward(q, k, v, [], program, q_chunk=cq, k_chunk=ck)
            cpu.attention_backward(dout, q, k, v, out, stats, [], program, q_chunk=cq, k_chunk=ck)

        peaks[n] = _peak_live_bytes(chunked)
        # out, lse, dq, dk, dv (N·D each) plus a handful of score blocks
        assert peaks[n] <= 8 * n * D * 4 + 8 * cq * ck * 4, f"N={n}: {peaks[n]} bytes"
    assert peaks[2048] < 2.5 * peaks[1024]  # N×N memory would grow 4x

    def eager():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (torch.softmax(qq @ kk.transpose(-2, -1) * 0.3, -1) @ vv).backward(dout)

    assert _peak_live_bytes(eager) >= 2048 * 2048 * 4  # the measure does see an N×N buffer
