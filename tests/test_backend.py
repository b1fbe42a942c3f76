"""torch.compile(..., backend="flashfx") end to end on CPU: fused, and at parity with eager."""

import math
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfx
from flashfx import config
from flashfx.passes import rewrite as rewrite_mod
from flashfx.passes.pipeline import counters


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---- the forms step 1 fuses -------------------------------------------------------------------


def plain_mul(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * 0.125, dim=-1) @ v


def plain_div(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return s.softmax(dim=-1).matmul(v)


def plain_bmm(q, k, v):  # 3-D
    return torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v)


def causal_triu(q, k, v):
    s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    n = q.size(-2)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)


def sdpa_float_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_bool_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class NanoGPTAttention(nn.Module):
    """Causal self-attention the way nanoGPT writes it: a tril buffer, sliced and compared."""

    def __init__(self, d=32, h=2, block=64):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):  # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))  # [B, h, T, hd]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


CASES = {
    "plain_mul": (plain_mul, lambda: [_rand(2, 3, 37, 16, seed=i) for i in range(3)]),
    "plain_div": (plain_div, lambda: [_rand(2, 3, 37, 16, seed=i) for i in range(3)]),
    "plain_bmm_cross": (plain_bmm, lambda: [_rand(4, 21, 8, seed=0), _rand(4, 30, 8, seed=1), _rand(4, 30, 8, seed=2)]),
    "causal_triu": (causal_triu, lambda: [_rand(1, 2, 45, 16, seed=i) for i in range(3)]),
    "sdpa_plain": (sdpa_plain, lambda: [_rand(2, 2, 33, 24, seed=i) for i in range(3)]),
    "sdpa_causal_scale": (sdpa_causal_scale, lambda: [_rand(2, 2, 20, 16, seed=0), _rand(2, 2, 33, 16, seed=1), _rand(2, 2, 33, 16, seed=2)]),
    "sdpa_float_mask": (sdpa_float_mask, lambda: [*(_rand(2, 2, 17, 16, seed=i) for i in range(3)), _rand(2, 1, 17, 17, seed=3)]),
    "sdpa_bool_mask": (sdpa_bool_mask, lambda: [*(_rand(2, 2, 17, 16, seed=i) for i in range(3)), _rand(17, 17, seed=3) > -0.5]),
}


def _check_parity(fn, args, inner, atol=2e-5):
    args = [a.clone().requires_grad_(i < 3) for i, a in enumerate(args)]  # q, k, v; masks need none
    before = counters["rewritten"]
    out = torch.compile(fn, backend="flashfx", options={"inner": inner})(*args)
    assert counters["rewritten"] > before, "flashfx did not rewrite the attention"
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    ref = fn(*ref_args)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-4)
    grad = _rand(*out.shape, seed=99)
    diff = [a for a in args if a.requires_grad]
    got = torch.autograd.grad(out, diff, grad)
    want = torch.autograd.grad(ref, [a for a in ref_args if a.requires_grad], grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=atol * 5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", ["chunked", "triton"])
def test_fused_and_at_parity(case, kernel, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", kernel)
    fn, make = CASES[case]
    _check_parity(fn, make(), inner="aot_eager")


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_inner_compilers(inner):
    fn, make = CASES["causal_triu"]
    _check_parity(fn, make(), inner=inner)


def test_nanogpt_module_fused_causal():
    torch.manual_seed(0)
    m = NanoGPTAttention()
    x = _rand(2, 40, 32)
    report = flashfx.explain(m, x)
    assert [s.fused for s in report.sites] == [True]
    assert "causal(top_left)" in report.sites[0].program
    before = counters["rewritten"]
    out = torch.compile(m, backend="flashfx", options={"inner": "aot_eager"})(x)
    assert counters["rewritten"] == before + 1
    torch.testing.assert_close(out, m(x), atol=2e-5, rtol=1e-4)


def causal_fixed_scale(q, k, v):
    n = q.size(-2)
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# dynamic=True makes the head dim symbolic too: a scale computed from it (size ** -0.5) becomes
# a 0-d tensor operand of the score program instead of a constant.
@pytest.mark.parametrize("fn, dynamic", [(plain_mul, None), (causal_triu, None), (plain_mul, True),
                                         (causal_fixed_scale, True), (causal_triu, True)])
def test_changing_sequence_length_stays_fused(fn, dynamic):
    from torch._dynamo.utils import counters as dynamo_counters

    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    c = torch.compile(fn, backend="flashfx", options={"inner": "aot_eager"}, dynamic=dynamic)
    with mock.patch.object(rewrite_mod, "rewrite_site", wraps=rewrite_mod.rewrite_site) as spy:
        for n in (20, 24, 40, 57):  # never 16 = D: equal sizes would specialize (duck sizing)
            q, k, v = (_rand(1, 2, n, 16, seed=i) for i in range(3))
            torch.testing.assert_close(c(q, k, v), fn(q, k, v), atol=2e-5, rtol=1e-4)
        seen = [call.args[1].program for call in spy.call_args_list]
    # automatic dynamic: one recompile with a symbolic N; dynamic=True: none. Every compile fused,
    # and a causal mask built from the (symbolic) length stays causal structure.
    assert len(seen) == (1 if dynamic else 2), seen
    assert all(p.causal == (None if fn is plain_mul else "top_left") and not p.ops[1:] for p in seen), seen
    if dynamic and fn is causal_triu:
        assert [op.name for op in seen[0].ops] == ["mul_x"]  # the symbolic scale, as an operand
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == len(seen)


# ---- what stays unfused, and why ------------------------------------------------------------


def returns_weights(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return p @ v, p


def softmax_wrong_dim(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def dropout_twice(q, k, v):
    p = F.dropout(F.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1), 0.1), 0.1)
    return p @ v


@pytest.mark.parametrize("fn, why", [
    (returns_weights, "another user"),
    (softmax_wrong_dim, "not the key dim"),
    (dropout_twice, "two dropouts"),
])
def test_unfused_sites_say_why_and_run_as_written(fn, why):
    q, k, v = (_rand(1, 2, 8, 16, seed=i) for i in range(3))
    report = flashfx.explain(fn, q, k, v)
    assert len(report.sites) == 1 and not report.sites[0].fused
    assert why in report.sites[0].reason
    assert __file__ in report.sites[0].location or os.path.basename(__file__) in report.sites[0].location
    assert "NOT fused" in str(report)
    torch.manual_seed(0)
    out = torch.compile(fn, backend="flashfx", options={"inner": "eager"})(q, k, v)
    torch.manual_seed(0)
    ref = fn(q, k, v)
    if fn is dropout_twice:  # unfused dropout draws its own masks: compare shapes only
        assert out.shape == ref.shape and torch.isfinite(out).all()
    else:
        torch.testing.assert_close(out, ref)


def test_graph_without_attention_is_unchanged():
    def f(x, w):
        return torch.softmax(x @ w, dim=-1).sum(0) + torch.tanh(x).mean()

    x, w = _rand(5, 7), _rand(7, 3, seed=1)
    before = dict(counters)
    out = torch.compile(f, backend="flashfx", options={"inner": "aot_eager"})(x, w)
    assert counters["rewritten"] == before.get("rewritten", 0)
    torch.testing.assert_close(out, f(x, w))
    assert flashfx.explain(f, x, w).sites == []


def test_explain_reports_location_and_plan():
    q, k, v = (_rand(1, 2, 8, 16, seed=i) for i in range(3))
    report = flashfx.explain(plain_mul, q, k, v)
    (site,) = report.sites
    assert site.fused and site.reason is None
    assert site.location.endswith(f"test_backend.py:{plain_mul.__code__.co_firstlineno + 1}")
    assert site.program == "scale(0.125)"
    assert "1 of 1 attention sites fused" in str(report)


def test_explain_names_the_sizes_a_plan_rounded_up():
    from flashfx.explain import _bucket_note

    # GPT-2's layer: 2 x 12 heads planned as 32 batch·heads, 4096 queries as they are
    assert _bucket_note((2, 12, 4096, 64), (2, 12, 4096, 64)) == "; planned for the shape bucket: B·H 24 as 32"
    note = _bucket_note((1, 8, 300, 64), (1, 8, 700, 64))
    assert note == "; planned for the shape bucket: N 300 as 512, Nk 700 as 1024"
    assert _bucket_note((2, 16, 1024, 64), (2, 16, 1024, 64)) == ""


def test_explain_says_when_the_forward_splits_its_key_range(monkeypatch):
    from flashfx import config
    from flashfx.runtime import gpu

    monkeypatch.setattr(config, "cpu_kernel", "triton")  # the kernels' plan, interpreted
    q, k, v = (_rand(1, 2, 8, 16, seed=i) for i in range(3))
    assert "parts" not in flashfx.explain(plain_mul, q, k, v).sites[0].plan
    monkeypatch.setattr(gpu, "FWD_SPLITS", 3)
    plan = flashfx.explain(plain_mul, q, k, v).sites[0].plan
    assert "fwd key range in 3 parts" in plan, plan


def test_compile_mode_reaches_inductor(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    q, k, v = (_rand(1, 2, 8, 16, seed=i) for i in range(3))
    torch._dynamo.reset()
    out = torch.compile(plain_mul, backend="flashfx", mode="reduce-overhead")(q, k, v)
    torch.testing.assert_close(out, plain_mul(q, k, v))
    assert seen and seen[-1].get("triton.cudagraphs") is True  # CUDA graphs around the whole graph
    assert "post_grad_custom_post_pass" in seen[-1]
    torch._dynamo.reset()
    torch.compile(plain_mul, backend="flashfx", options={"inner": "inductor"})(q, k, v)
    assert "triton.cudagraphs" not in seen[-1]
    torch._dynamo.reset()


def test_a_graph_of_fused_sites_alone_skips_the_inner_compiler(monkeypatch):
    """Inductor would find nothing to compile in a graph that is one fused site; the graph runs
    as it is and its backward goes through the op's autograd. Given any other op, or inner
    named explicitly, the inner compiler runs."""
    from flashfx import backend

    inner = []
    real = backend.inner_compile
    monkeypatch.setattr(backend, "inner_compile", lambda gm, ex, name, mode=None: inner.append(name) or real(gm, ex, name, mode))
    q, k, v, do = (_rand(2, 2, 24, 16, seed=i) for i in range(4))
    for fn, options, want in ((causal_triu, None, []),
                              (lambda q, k, v: torch.relu(plain_mul(q, k, v)), None, ["inductor"]),
                              (causal_triu, {"inner": "inductor"}, ["inductor"])):
        inner.clear()
        torch._dynamo.reset()
        before = counters["rewritten"]
        got_in = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.compile(fn, backend="flashfx", options=options)(*got_in)
        out.backward(do)
        assert counters["rewritten"] == before + 1 and inner == want, (inner, want)
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = fn(*ref_in)
        ref.backward(do.double())
        for got, ref_t in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(got_in, ref_in)]:
            torch.testing.assert_close(got.double(), ref_t, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_compile_mode_errors_are_clear():
    from flashfx.backend import mode_settings

    with pytest.raises(ValueError, match="Unrecognized mode=fast"):
        mode_settings("fast", "inductor")
    with pytest.raises(ValueError, match="inner compiler is 'eager'"):
        mode_settings("reduce-overhead", "eager")
    assert mode_settings("default", "eager") == {}


def test_unknown_option_is_a_clear_error():
    with pytest.raises(Exception, match="unknown option 'innr'"):
        torch.compile(plain_mul, backend="flashfx", options={"innr": "eager"})(*(_rand(1, 1, 4, 16) for _ in range(3)))


def test_backend_found_without_import_in_a_fresh_process():
    code = (
        "import sys, torch\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "f = lambda q: torch.softmax(q @ q.transpose(-2, -1) * 0.25, -1) @ q\n"
        "out = torch.compile(f, backend='flashfx', options={'inner': 'eager'})(q)\n"
        "assert 'flashfx' in sys.modules, 'backend not loaded'\n"
        "torch.testing.assert_close(out, f(q))\n"
        "from flashfx.passes.pipeline import counters\n"
        "assert counters['rewritten'] == 1, counters\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["plain_div", "causal_triu", "sdpa_causal_scale", "sdpa_bool_mask"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_gpu_compiled_with_each_inner(case, dtype, inner):
    fn, make = CASES[case]
    args = [a.cuda() for a in make()]
    if case == "causal_triu":  # the mask is built on the device the inputs live on
        def fn(q, k, v):  # noqa: F811
            s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
            n = q.size(-2)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            return torch.softmax(s, dim=-1) @ v
    low = [a.to(dtype).requires_grad_(i < 3) if a.is_floating_point() else a for i, a in enumerate(args)]
    before = counters["rewritten"]
    out = torch.compile(fn, backend="flashfx", options={"inner": inner})(*low)
    assert counters["rewritten"] > before
    ref_in = [a.detach().double().requires_grad_(i < 3) if a.is_floating_point() else a for i, a in enumerate(low)]
    ref = fn(*ref_in)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(low[:3], ref_in[:3])]:
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1.6e-2, err


@pytest.mark.gpu
def test_gpu_reduce_overhead_mode_replays_cuda_graphs():
    # mode="reduce-overhead": the compiled step, flashfx's kernels included, runs as CUDA graph
    # replays; fresh inputs each step must still give fresh, right results
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        n = q.size(-2)
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="flashfx", mode="reduce-overhead")
    for step in range(4):
        q, k, v = (_rand(2, 4, 256, 64, seed=10 * step + i).cuda().bfloat16().requires_grad_() for i in range(3))
        out = compiled(q, k, v)
        ref_in = [a.detach().double().requires_grad_() for a in (q, k, v)]
        ref = fn(*ref_in)
        grad = torch.randn_like(ref)
        out.backward(grad.bfloat16())
        ref.backward(grad)
        for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip((q, k, v), ref_in)]:
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < 1.6e-2, (step, err)
    torch._dynamo.reset()


# ---- dropout in training ------------------------------------------------------------------------


class DropoutAttention(nn.Module):
    def __init__(self, p=0.2, sdpa=False):
        super().__init__()
        self.drop, self.p, self.sdpa = nn.Dropout(p), p, sdpa

    def forward(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        n = q.size(-2)
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.drop(torch.softmax(s, dim=-1)) @ v


@pytest.mark.parametrize("sdpa", [False, True], ids=["nn.Dropout", "sdpa_dropout_p"])
def test_dropout_in_training_is_fused_and_its_gradient_is_exact(sdpa):
    """Training-mode dropout becomes part of the fused op. Seeding torch's generator makes a
    call repeatable, so a float64 gradcheck can check the backward against finite
    differences of the forward, with the same masks."""
    model = DropoutAttention(0.2, sdpa).train()
    q, k, v = (_rand(1, 2, 12, 8, seed=i, dtype=torch.float64).requires_grad_() for i in range(3))
    report = flashfx.explain(model, q, k, v)
    assert report.fused == 1 and "dropout(0.2)" in report.sites[0].program, report
    compiled = torch.compile(model, backend="flashfx", options={"inner": "aot_eager"})

    def seeded(q, k, v):
        torch.manual_seed(0)
        return compiled(q, k, v)

    out = seeded(q, k, v)
    torch.testing.assert_close(out, seeded(q, k, v))  # same seed, same masks
    assert not torch.allclose(out, model.eval()(q, k, v))  # dropout did something
    model.train()
    assert torch.autograd.gradcheck(seeded, (q, k, v), eps=1e-6, atol=1e-5)
    # the masks change from call to call
    assert not torch.allclose(compiled(q, k, v), compiled(q, k, v))


def test_inductor_cache_key_follows_the_runtime_sources(tmp_path, monkeypatch):
    """Inductor caches compiled graphs on disk by their code; flashfx's no-op pass puts a hash
    of its op and kernel sources into that key, so a changed op is never called the old way."""
    from flashfx import backend

    src = tmp_path / "ops.py"
    src.write_text("v1")
    monkeypatch.setattr(backend, "_runtime_files", lambda: [str(src)])
    first = backend._runtime_version().uuid()
    src.write_text("v2")
    assert backend._runtime_version().uuid() != first


def test_inductor_graphs_call_the_kernel_ops():
    """Autograd is traced out of the graphs inductor compiles: flashfx's post-grad pass points
    their calls at the ops' kernel ops, which have no Autograd kernel to pass through, and the
    compiled forward and backward still match eager."""
    from torch._inductor.utils import fresh_inductor_cache, run_and_get_code

    def attn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        return torch.softmax(s, dim=-1) @ v

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(4))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    torch._dynamo.reset()
    with fresh_inductor_cache():
        compiled = torch.compile(attn, backend="flashfx", options={"inner": "inductor"})
        out, code = run_and_get_code(lambda: compiled(qs, ks, vs))
        (grads, bwd_code) = run_and_get_code(lambda: torch.autograd.grad(out, (qs, ks, vs), do))
    code = "\n".join(code + bwd_code)
    assert "flashfx.attention_kernel.default(" in code and "flashfx.attention_backward_kernel.default(" in code
    assert "flashfx.attention.default(" not in code and "flashfx.attention_backward.default(" not in code
    qe, ke, ve = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attn(qe, ke, ve)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (qe, ke, ve), do)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
