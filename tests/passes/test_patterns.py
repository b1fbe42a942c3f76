"""The pattern registry: spellings of a step on the scores, built in and registered by users."""

import math

import pytest
import torch
import torch.nn.functional as F

import flashfx
from flashfx import config, scoreops
from flashfx.passes import patterns
from flashfx.passes.pipeline import counters


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _qkv(nq=19, nk=23, seed=0):
    return [_rand(2, 3, n, 16, seed=seed + i) for i, n in enumerate((nq, nk, nk))]


def _check_parity(fn, args, n_grad=3):
    """Compiled (aot_eager) against eager in float64, forward and backward, fresh inputs."""
    args = [a.clone().requires_grad_(i < n_grad) for i, a in enumerate(args)]
    before = counters["rewritten"]
    out = torch.compile(fn, backend="flashfx", options={"inner": "aot_eager"})(*args)
    assert counters["rewritten"] > before, "flashfx did not rewrite the attention"
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    ref = fn(*ref_args)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    grad = _rand(*out.shape, seed=99)
    got = torch.autograd.grad(out, [a for a in args if a.requires_grad], grad)
    want = torch.autograd.grad(ref, [a for a in ref_args if a.requires_grad], grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def _explain(fn, *args):
    report = flashfx.explain(fn, *args)
    assert len(report.sites) == 1, str(report)
    return report.sites[0]


# ---- a user teaches flashfx a new spelling ------------------------------------------------------


def hard_capped(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s = F.hardtanh(s, min_val=-1.5, max_val=1.5)
    return torch.softmax(s, dim=-1) @ v


@pytest.fixture
def hardtanh_pattern():
    patterns.register_pattern(
        "hardtanh",
        lambda s, lo, hi: F.hardtanh(s, lo, hi),
        lambda lo, hi: [flashfx.Step("clamp_min", c=lo.value), flashfx.Step("clamp_max", c=hi.value)]
        if lo.value is not None and hi.value is not None else "hardtanh with tensor bounds",
    )
    yield
    patterns.unregister_pattern("hardtanh")


def test_unknown_step_is_a_site_with_a_reason():
    site = _explain(hard_capped, *_qkv())
    assert not site.fused and "unsupported op in the score program: hardtanh" in site.reason


@pytest.mark.parametrize("kernel", ["chunked", "triton"])
def test_registered_pattern_fuses_a_new_spelling(hardtanh_pattern, kernel, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", kernel)
    q, k, v = _qkv()
    site = _explain(hard_capped, q, k, v)
    assert site.fused, site.reason
    assert site.program == "scale(0.25) -> clamp_min(-1.5) -> clamp_max(1.5)"
    s = (q @ k.transpose(-2, -1) * 0.25).abs()
    assert (s > 1.5).float().mean() > 0.1  # the clamp is active: its gradient is tested
    _check_parity(hard_capped, [q, k, v])


def symlog_scores(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    s = torch.sign(s) * torch.log1p(s.abs())  # reads the scores twice
    return torch.softmax(s, dim=-1) @ v


@pytest.fixture
def symlog_op():
    flashfx.register_score_op(
        "symlog",
        torch=lambda s, x, c: torch.sign(s) * torch.log1p(s.abs()),
        torch_grad=lambda g, s, x, c: g / (1 + s.abs()),
        triton="tl.where(s < 0, -1.0, 1.0) * tl.log(1.0 + tl.abs(s))",
        triton_grad="g / (1.0 + tl.abs(s))",
        doc="sign(s)·log(1 + |s|)",
    )
    flashfx.register_pattern("symlog", lambda s: torch.sign(s) * torch.log1p(torch.abs(s)), lambda: [flashfx.Step("symlog")])
    yield
    patterns.unregister_pattern("symlog")
    scoreops._REGISTRY.pop("symlog", None)


@pytest.mark.parametrize("kernel", ["chunked", "triton"])
def test_new_score_op_and_pattern_together(symlog_op, kernel, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", kernel)
    q, k, v = _qkv(seed=3)
    site = _explain(symlog_scores, q, k, v)
    assert site.fused and site.program == "scale(0.25) -> symlog()", site.reason or site.program
    _check_parity(symlog_scores, [q, k, v])


def test_replacement_reason_is_reported():
    patterns.register_pattern("picky", lambda s: F.hardtanh(s), lambda: "hardtanh is not for us")
    try:
        def f(q, k, v):
            return torch.softmax(F.hardtanh(q @ k.transpose(-2, -1)), dim=-1) @ v

        site = _explain(f, *_qkv())
        assert not site.fused and site.reason == "hardtanh is not for us"
    finally:
        patterns.unregister_pattern("picky")


def test_replacement_naming_an_unknown_score_op_is_a_reason():
    patterns.register_pattern("typo", lambda s: F.hardtanh(s), lambda: [flashfx.Step("clmap_min", c=0.0)])
    try:
        def f(q, k, v):
            return torch.softmax(F.hardtanh(q @ k.transpose(-2, -1)), dim=-1) @ v

        site = _explain(f, *_qkv())
        assert not site.fused and "typo" in site.reason and "clmap_min" in site.reason
    finally:
        patterns.unregister_pattern("typo")


def test_builtin_steps_are_registered_patterns():
    names = {p.name for p in patterns.patterns()}
    assert {"scale", "div", "bias", "masked_fill", "where_keep", "where_drop", "tanh", "clamp"} <= names


# ---- built-in steps, spelled the ways models write them ----------------------------------------


def clamp_kwargs(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)).clamp(min=-2.0, max=2.5), dim=-1) @ v


def clamp_functions(q, k, v):
    s = torch.clamp_min(q @ k.transpose(-2, -1), -2.0)
    return torch.softmax(torch.clamp(s, None, 2.5), dim=-1) @ v


def scale_on_the_left(q, k, v):
    return torch.softmax(0.3 * (q @ k.transpose(-2, -1)), dim=-1) @ v


def scale_before_matmul(q, k, v):  # DeBERTa: Kᵀ / sqrt(d) held in a 0-d tensor of constants
    scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float) * 2)
    return torch.softmax(torch.matmul(q * 0.5, k.transpose(-1, -2) / scale), dim=-1) @ v


def where_tensor_fill(q, k, v):  # GPT-Neo: fill held in a 0-d tensor
    n, m = q.size(-2), k.size(-2)
    keep = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    s = torch.where(keep, q @ k.transpose(-2, -1), torch.tensor(torch.finfo(torch.float32).min))
    return torch.softmax(s, dim=-1) @ v


def masked_fill_zero(q, k, v, mask):  # a finite fill that is a value, not a mask
    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(mask, 0.0), dim=-1) @ v


def add_bool_mask(q, k, v, mask):  # float scores + bool tensor: torch adds 1.0 where True
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, dim=-1) @ v


def sdpa_single_kv_head(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], attn_mask=mask)


def bmm_view_bias_view(q, k, v, bias):  # [B·H] scores viewed to [B, H] for the bias and back
    b, h, n, d = q.shape
    s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, -1, d).transpose(1, 2))
    s = (s.view(b, h, n, -1) + bias).view(b * h, n, -1)
    return torch.bmm(torch.softmax(s, dim=-1), v.reshape(b * h, -1, d)).view(b, h, n, d)


def max_floor(q, k, v):  # XGLM: scores floored at finfo.min with a 0-d tensor, torch.max
    s = q @ k.transpose(-2, -1) * 0.25
    s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min))
    return torch.softmax(s, dim=-1) @ v


def maximum_minimum_methods(q, k, v):  # the same bounds as methods, both sides
    s = (q @ k.transpose(-2, -1)).maximum(torch.tensor(-1.5)).min(torch.tensor(2.0))
    return torch.softmax(s, dim=-1) @ v


def _mask(nq=19, nk=23, seed=5):
    return _rand(nq, nk, seed=seed) > 0.3


SPELLINGS = {
    "clamp_kwargs": (clamp_kwargs, lambda: _qkv(), "clamp_min(-2) -> clamp_max(2.5)"),
    "clamp_functions": (clamp_functions, lambda: _qkv(), "clamp_min(-2) -> clamp_max(2.5)"),
    "scale_on_the_left": (scale_on_the_left, lambda: _qkv(), "scale(0.3)"),
    "scale_before_matmul": (scale_before_matmul, lambda: _qkv(), "scale(0.5) -> scale(0.176777)"),
    "where_tensor_fill": (where_tensor_fill, lambda: _qkv(), "causal(bottom_right)"),
    "masked_fill_zero": (masked_fill_zero, lambda: [*_qkv(), _mask()], "drop(operand0, 0)"),
    "add_bool_mask": (add_bool_mask, lambda: [*_qkv(), _mask()], "scale(0.25) -> bias(operand0)"),
    "sdpa_single_kv_head": (sdpa_single_kv_head, lambda: [*_qkv(), _mask()], "scale(0.25) -> keep(operand0, -inf)"),
    "max_floor": (max_floor, lambda: _qkv(), "scale(0.25) -> clamp_min(-3.40282e+38)"),
    "maximum_minimum_methods": (maximum_minimum_methods, lambda: _qkv(), "clamp_min(-1.5) -> clamp_max(2)"),
    "bmm_view_bias_view": (bmm_view_bias_view, lambda: [*_qkv(), _rand(2, 3, 1, 23, seed=6)], "bias(operand0)"),
}


@pytest.mark.parametrize("case", SPELLINGS)
def test_builtin_spellings_fused_and_at_parity(case):
    fn, make, program = SPELLINGS[case]
    args = make()
    site = _explain(fn, *args)
    assert site.fused, site.reason
    assert site.program == program
    _check_parity(fn, args)


# ---- what stays unfused says why -----------------------------------------------------------------


def where_runtime_fill(q, k, v, mask, fill):
    return torch.softmax(torch.where(mask, q @ k.transpose(-2, -1), fill), dim=-1) @ v


def exp_scores(q, k, v):
    return torch.softmax(torch.exp(q @ k.transpose(-2, -1)), dim=-1) @ v


def clamp_tensor_bound(q, k, v, lo):
    return torch.softmax(torch.clamp(q @ k.transpose(-2, -1), min=lo), dim=-1) @ v


def maximum_runtime_bound(q, k, v, lo):
    return torch.softmax(torch.maximum(q @ k.transpose(-2, -1), lo), dim=-1) @ v


def five_d_scores(q, k, v):  # heads grouped as [B, Hk, G, N, N]
    b, h, n, d = q.shape
    s = q.view(b, 1, h, n, d) @ k[:, :1, None].transpose(-2, -1)
    return (torch.softmax(s, dim=-1) @ v[:, :1, None]).view(b, h, n, d)


@pytest.mark.parametrize("fn, extra, why", [
    (where_runtime_fill, lambda: [_mask(), torch.tensor(-1e9)], "computed at run time"),
    (exp_scores, lambda: [], "unsupported op in the score program: exp"),
    (clamp_tensor_bound, lambda: [torch.tensor(-1.0)], "tensor bound"),
    (maximum_runtime_bound, lambda: [torch.tensor(-1.0)], "elementwise max with a tensor bound"),
    (five_d_scores, lambda: [], "rank 5"),
])
def test_unfused_softmax_is_reported_with_a_reason(fn, extra, why):
    args = [*_qkv(), *extra()]
    site = _explain(fn, *args)
    assert not site.fused and why in site.reason, site.reason
    out = torch.compile(fn, backend="flashfx", options={"inner": "eager"})(*args)
    torch.testing.assert_close(out, fn(*args))


def scores_across_a_graph_break(q, k, v):  # DeBERTa v1: an .item() splits the graph
    s = q @ k.transpose(-2, -1)
    torch._dynamo.graph_break()
    return torch.softmax(s * 0.25, dim=-1) @ v


def softmax_of_a_graph_input(logits, w):  # a classifier head: softmax then matmul, not attention
    return torch.softmax(logits, dim=-1) @ w


def test_a_graph_break_inside_attention_is_a_site_with_a_reason():
    args = _qkv()
    site = _explain(scores_across_a_graph_break, *args)
    assert not site.fused and "earlier graph" in site.reason and "graph break" in site.reason
    out = torch.compile(scores_across_a_graph_break, backend="flashfx")(*args)
    torch.testing.assert_close(out, scores_across_a_graph_break(*args))
    # a softmax of a 2-D input feeding a matmul is no attention site at all
    assert not flashfx.explain(softmax_of_a_graph_input, _rand(5, 7), _rand(7, 3)).sites


def upcast_qk(q, k, v):  # GPT-J / GPT-Neo: QKᵀ in fp32 from bf16 q and k, probabilities cast back
    s = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) / 4.0
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def test_fp32_upcast_of_q_and_k_reads_the_narrow_tensors():
    q, k, v = (x.bfloat16() for x in _qkv(seed=8))
    site = _explain(upcast_qk, q, k, v)
    assert site.fused and site.dtype == "bfloat16", site.reason
    out = torch.compile(upcast_qk, backend="flashfx", options={"inner": "aot_eager"})(q, k, v)
    ref = upcast_qk(q.double(), k.double(), v.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
