"""Dropout on the attention probabilities inside the fused op (chunked CPU path and the
Triton kernels): the mask is a pure function of (seed, position), so the backward regenerates
the forward's mask; checked exactly against a reference that uses the same mask, and
statistically for its rate."""

import math

import pytest
import torch

from flashfx import config
from flashfx.ir import ScoreOp, ScoreProgram

P = 0.25
B, H, Hk, N, D = 2, 4, 2, 24, 32  # D ≥ N: v = identity reads the weights back out


def _program(causal=None, p=P):
    return ScoreProgram((ScoreOp("scale", None, 0.3),), causal, p).encode()


def _seed(x):
    return torch.tensor(x, dtype=torch.int64)


def _kept(seed, dtype, device="cpu"):
    """The op's keep mask [B, H, N, N], read back with v = identity: out = p ∘ keep / (1 - P)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, Hk, N, D, generator=g, dtype=dtype).to(device)
    eye = torch.eye(N, D, dtype=dtype, device=device).expand(B, Hk, N, D)
    out = torch.ops.flashfx.attention(q, k, eye, [], _program(), _seed(seed).to(device))[0]
    return (out[..., :N] != 0).cpu()


@pytest.fixture(params=["chunked", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel(request, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", "chunked" if request.param == "cuda" else request.param)
    return request.param


def _device(kernel):
    return "cuda" if kernel == "cuda" else "cpu"


def test_mask_rate_and_independence(kernel):
    dev = _device(kernel)
    keep = _kept(1234, torch.float32, dev)
    n = keep.numel()
    rate = 1 - keep.float().mean().item()
    assert abs(rate - P) < 5 * math.sqrt(P * (1 - P) / n), rate  # 5 sigma of a binomial
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, _kept(1235, torch.float32, dev))  # another seed, another mask
    assert torch.equal(keep, _kept(1234, torch.float32, dev))  # the same seed, the same mask


@pytest.mark.parametrize("causal", [None, "top_left"])
def test_forward_and_backward_match_a_reference_with_the_same_mask(kernel, causal):
    dtype = torch.float64 if kernel == "chunked" else torch.float32
    dev = _device(kernel)
    keep = _kept(77, dtype, dev).to(dev)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype).to(dev).requires_grad_()
    k, v = (torch.randn(B, Hk, N, D, generator=g, dtype=dtype).to(dev).requires_grad_() for _ in range(2))
    dout = torch.randn(B, H, N, D, generator=g, dtype=dtype).to(dev)

    out = torch.ops.flashfx.attention(q, k, v, [], _program(causal), _seed(77).to(dev))[0]
    got = torch.autograd.grad(out, (q, k, v), dout)
    s = q @ k.repeat_interleave(H // Hk, 1).transpose(-2, -1) * 0.3
    if causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=dev).tril(), float("-inf"))
    ref = (torch.softmax(s, -1) * keep / (1 - P)) @ v.repeat_interleave(H // Hk, 1)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_gqa_packing_does_not_change_the_mask(kernel, causal, monkeypatch):
    # a forward whose tiles hold a GQA group's heads together draws each score's keep bit at
    # the same (batch·head, query, key) index as one head per tile: same output, same gradients
    if kernel == "chunked":
        pytest.skip("the chunked path has no tiles to pack")
    from flashfx.runtime import gpu

    dev = _device(kernel)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 8, 5, D, generator=g).to(dev).requires_grad_()
    k, v = (torch.randn(B, Hk, N, D, generator=g).to(dev).requires_grad_() for _ in range(2))
    dout = torch.randn(B, 8, 5, D, generator=g).to(dev)
    results = []
    for pack in (True, False):
        monkeypatch.setattr(gpu, "GQA_PACK", pack)
        out = torch.ops.flashfx.attention(q, k, v, [], _program(causal), _seed(11).to(dev))[0]
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_the_mask():
    from flashfx.runtime import cpu
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 33, 16, generator=g, dtype=torch.float64) for _ in range(2))
    program = ScoreProgram(dropout=0.5)
    whole = cpu.attention_forward(q, k, v, [], program, seed=5, q_chunk=64, k_chunk=64)[0]
    for chunks in [(7, 5), (16, 33), (1, 1)]:
        got = cpu.attention_forward(q, k, v, [], program, seed=5, q_chunk=chunks[0], k_chunk=chunks[1])[0]
        torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def test_dropout_without_a_seed_is_a_clear_error():
    q = k = v = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="needs `seed`"):
        torch.ops.flashfx.attention(q, k, v, [], _program())
