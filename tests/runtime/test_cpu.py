"""The CPU chunked path against the float64 reference, and its O(N·chunk) memory."""

import pytest
import torch

from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime import cpu
from tests.reference import reference_attention

S = ScoreOp("scale", None, 0.3)
PROGRAMS = {
    "scale": ScoreProgram((S,)),
    "causal": ScoreProgram((S,), "top_left"),
    "bottom_right": ScoreProgram((S,), "bottom_right"),
    "bias_pad": ScoreProgram((S, ScoreOp("bias", 0), ScoreOp("keep", 1, float("-inf")))),
    "drop_causal": ScoreProgram((ScoreOp("drop", 2, -1e30), S), "top_left"),
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _case(B, H, Hk, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q = r(B, Nq, H, D).transpose(1, 2)  # non-contiguous, as models produce them
    k, v = r(B, Nk, Hk, D).transpose(1, 2), r(B, Nk, Hk, D).transpose(1, 2)
    xs = [
        r(1, H, Nq, Nk).expand(B, H, Nq, Nk),  # relative-position-like bias
        (torch.rand(B, 1, 1, Nk, generator=g) > 0.2).expand(B, H, Nq, Nk),  # padding, keep
        (torch.rand(1, 1, Nq, Nk, generator=g) > 0.8).expand(B, H, Nq, Nk),  # random drop
    ]
    return q, k, v, xs


@pytest.mark.parametrize("prog", PROGRAMS)
@pytest.mark.parametrize("shape", [(2, 2, 2, 37, 37, 16), (1, 4, 2, 29, 53, 80), (2, 4, 1, 50, 31, 24)],
                         ids=["square", "gqa-cross", "mqa-nq>nk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_chunked_matches_reference(prog, shape, dtype):
    q, k, v, xs = _case(*shape, dtype)
    program = PROGRAMS[prog]
    out, lse = cpu.attention_forward(q, k, v, xs, program, q_chunk=16, k_chunk=24)
    assert out.stride() == q.stride()  # the layout the op's fake implementation promises
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, xs, program, q_chunk=16, k_chunk=24)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, xs, program)
    ref.backward(dout.double())
    for name, got, want in (("out", out, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert torch.isfinite(got).all(), name
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOL[dtype], f"{name}: {err:.1e}"


def test_fully_masked_rows_give_zero_and_no_nan():
    q, k, v, _ = _case(1, 2, 2, 20, 12, 16, torch.float32)
    program = ScoreProgram((S,), "bottom_right")  # Nq > Nk: the first 8 rows see no key
    out, lse = cpu.attention_forward(q, k, v, [], program, q_chunk=8, k_chunk=8)
    assert (out[:, :, :8] == 0).all() and torch.isinf(lse[:, :, :8]).all()
    dq, dk, dv = cpu.attention_backward(torch.randn_like(out), q, k, v, out, lse, [], program, q_chunk=8, k_chunk=8)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[:, :, :8] == 0).all()


def test_default_chunks_respect_the_budget():
    for bh, n in [(1, 16384), (32, 16384), (64, 1000), (1, 100)]:
        cq, ck = cpu.chunk_sizes(bh, n, n)
        assert cq <= cpu.MAX_Q_CHUNK and ck <= cpu.MAX_K_CHUNK
        assert bh * cq * ck <= max(cpu.SCORE_BLOCK_BUDGET, bh * 16 * 64)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while running fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_no_n_by_n_allocation():
    n, d = 1024, 16
    q, k, v, _ = _case(1, 1, 1, n, n, d, torch.float32)
    program = PROGRAMS["causal"]
    scores_bytes = n * n * 4

    def fwd_bwd():
        out, lse = cpu.attention_forward(q, k, v, [], program, q_chunk=128, k_chunk=128)
        cpu.attention_backward(torch.randn_like(out), q, k, v, out, lse, [], program, q_chunk=128, k_chunk=128)

    def eager():
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1)
        return p @ v

    assert _largest_allocation(eager) >= scores_bytes  # the measure sees an N×N buffer when there is one
    assert _largest_allocation(fwd_bwd) <= 128 * 128 * 4 * 2
