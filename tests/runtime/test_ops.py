"""The custom op's registration: fake tensors, autograd, schema (torch.library.opcheck)."""

import pytest
import torch

from flashfx import config
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.runtime import ops

PROGRAM = ScoreProgram((ScoreOp("scale", None, 0.25), ScoreOp("bias", 0)), "bottom_right").encode()
# a positive scale and infinite masks: the op saves one plane of row statistics, not two
LSE_PROGRAM = ScoreProgram((ScoreOp("scale", None, 0.25), ScoreOp("keep", 0, float("-inf"))), "bottom_right").encode()


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    # [B, N, H, D] storage seen as [B, H, N, D]: outputs must keep these strides
    q = torch.randn(2, 19, 4, 16, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 23, 2, 16, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 23, 2, 16, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    bias = torch.randn(1, 4, 1, 23, generator=g, dtype=dtype)
    return q, k, v, [bias]


@pytest.mark.parametrize("program", [PROGRAM, LSE_PROGRAM], ids=["two-planes", "one-plane"])
@pytest.mark.parametrize("kernel", ["chunked", "triton"])
def test_opcheck(kernel, program, monkeypatch):
    monkeypatch.setattr(config, "cpu_kernel", kernel)
    q, k, v, xs = _inputs()
    if program == LSE_PROGRAM:
        xs = [torch.rand(2, 1, 1, 23, generator=torch.Generator().manual_seed(2)) > 0.3]
    torch.library.opcheck(torch.ops.flashfx.attention.default, (q, k, v, xs, program))


def test_stats_planes_follow_the_program():
    scale = ScoreOp("scale", None, 0.3)
    keep = ScoreOp("keep", 0, float("-inf"))
    assert ScoreProgram((scale,)).stats_planes == 1
    assert ScoreProgram((scale, keep, ScoreOp("drop", 1, float("-inf"))), "top_left", 0.1).stats_planes == 1
    assert ScoreProgram((ScoreOp("scale", None, -0.3), keep)).stats_planes == 2  # the max flips
    assert ScoreProgram((scale, ScoreOp("keep", 0, -1e4))).stats_planes == 2  # a finite fill
    assert ScoreProgram((scale, ScoreOp("bias", 0))).stats_planes == 2
    assert ScoreProgram((keep, scale)).stats_planes == 2  # not led by the scale
    assert ScoreProgram().stats_planes == 2


@pytest.mark.parametrize("program", [PROGRAM, LSE_PROGRAM], ids=["two-planes", "one-plane"])
@pytest.mark.parametrize("kernel", ["chunked", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stats_are_the_log_sum_exp(kernel, program, monkeypatch):
    """Either form of the saved statistics sums to the rows' log-sum-exp; rows that see no
    key (a bottom-right diagonal with more queries than keys) give -inf."""
    monkeypatch.setattr(config, "cpu_kernel", "chunked" if kernel == "cuda" else kernel)
    dev = "cuda" if kernel == "cuda" else "cpu"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64) for n in (30, 23, 23))
    prog = ScoreProgram.decode(program)
    if prog.stats_planes == 1:
        x = torch.rand(2, 1, 1, 23, generator=g) > 0.3
        fill = float("-inf")
    else:
        x = torch.randn(1, 4, 1, 23, generator=g, dtype=torch.float64)
    s = q @ k.transpose(-2, -1) * 0.25
    s = s.masked_fill(~x, fill) if prog.stats_planes == 1 else s + x
    s = s.masked_fill(torch.ones(30, 23, dtype=torch.bool).tril(23 - 30).logical_not(), float("-inf"))
    want = torch.logsumexp(s, -1)
    dtype = torch.float64 if kernel == "chunked" else torch.float32
    _, stats = torch.ops.flashfx.attention(*(t.to(dev, dtype) for t in (q, k, v)), [x.to(dev, x.dtype if x.dtype == torch.bool else dtype)], program)
    assert stats.shape == (prog.stats_planes, 2, 4, 30)
    got = stats.double().cpu().sum(0)
    assert torch.isneginf(got[..., :7]).all() and torch.isneginf(want[..., :7]).all()
    torch.testing.assert_close(got[..., 7:], want[..., 7:], rtol=1e-5, atol=1e-5)


def test_gradcheck_chunked_float64():
    # small (every input element is perturbed twice), with GQA, Nq != Nk and the bias operand
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 7, 4, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
            for _ in range(2))
    xs = [torch.randn(1, 4, 1, 9, generator=g, dtype=torch.float64)]
    f = lambda q, k, v: torch.ops.flashfx.attention(q, k, v, xs, PROGRAM)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5)


def test_double_backward_is_a_clear_error():
    q, k, v, xs = _inputs(torch.float64)
    out = torch.ops.flashfx.attention(q, k, v, xs, PROGRAM)[0]
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    # a plain backward still works after it
    out = torch.ops.flashfx.attention(q, k, v, xs, PROGRAM)[0]
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all()


BIAS_SHAPES = {"rel_pos": (1, 4, 19, 23), "padding": (2, 1, 1, 23), "per_head": (4, 1, 1), "full": (2, 4, 19, 23)}


@pytest.mark.parametrize("kernel", ["chunked", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_gradients_of_score_operands(shape, kernel, monkeypatch):
    """A learned bias (T5's relative positions) and a learned per-head scale get their
    gradients, summed over the dims they broadcast along, as eager autograd gives them."""
    monkeypatch.setattr(config, "cpu_kernel", "chunked" if kernel == "cuda" else kernel)
    dtype = torch.float64 if kernel == "chunked" else torch.float32
    dev = "cuda" if kernel == "cuda" else "cpu"
    q, k, v = (t.detach().to(dev).requires_grad_() for t in _inputs(dtype)[:3])
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(BIAS_SHAPES[shape], generator=g, dtype=dtype).to(dev).requires_grad_()
    temp = (torch.rand(4, 1, 1, generator=g, dtype=dtype) + 0.5).to(dev).requires_grad_()
    program = ScoreProgram((ScoreOp("mul_x", 1), ScoreOp("bias", 0), ScoreOp("div_x", 1)), "bottom_right").encode()
    dout = torch.randn(2, 4, 19, 16, generator=g, dtype=dtype).to(dev)

    out = torch.ops.flashfx.attention(q, k, v, [bias, temp], program)[0]
    got = torch.autograd.grad(out, (q, k, v, bias, temp), dout)
    kk, vv = (t.repeat_interleave(2, 1) for t in (k, v))
    s = ((q @ kk.transpose(-2, -1)) * temp + bias) / temp
    s = s.masked_fill(~torch.ones(19, 23, dtype=torch.bool, device=dev).tril(23 - 19), float("-inf"))
    want = torch.autograd.grad(torch.softmax(s, -1) @ vv, (q, k, v, bias, temp), dout)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, a, b in zip(["q", "k", "v", "bias", "temp"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


def test_operand_of_an_op_without_a_gradient_is_a_clear_error():
    q, k, v, _ = _inputs()
    mask = torch.ones(23, dtype=torch.bool)
    program = ScoreProgram((ScoreOp("keep", 0, float("-inf")),)).encode()
    torch.ops.flashfx.attention(q, k, v, [mask], program)  # a mask: nothing to differentiate
    from flashfx import scoreops
    scoreops.register_score_op("test_shift", operand="float", torch=lambda s, x, c: s - x,
                               torch_grad=lambda g, s, x, c: g, triton="s - x", triton_grad="g")
    shift = torch.randn(23).requires_grad_()
    with pytest.raises(NotImplementedError, match="no gradient for its operand"):
        torch.ops.flashfx.attention(q, k, v, [shift], ScoreProgram((ScoreOp("test_shift", 0),)).encode())


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v, xs: (q, k[..., :8], v, xs), "head dims"),
    (lambda q, k, v, xs: (q, k, v, [torch.randn(3, 23)]), "does not broadcast"),
    (lambda q, k, v, xs: (q, k, v, xs, "{not json"), "malformed score program"),
])
def test_bad_input_is_a_clear_error(bad, match):
    args = bad(*_inputs())
    if len(args) == 4:
        args = (*args, PROGRAM)
    with pytest.raises(Exception, match=match):
        torch.ops.flashfx.attention(*args)


@pytest.mark.parametrize("kernel", ["chunked", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rows_of_finfo_min_fills_match_eager(kernel, monkeypatch):
    """Left padding with an additive finfo.min mask (Hugging Face's eager style): rows whose
    every key is masked have all scores ≈ finfo.min. Eager softmax gives them uniform weights
    and autograd sends gradient through them; the fused op must do the same, in both passes."""
    monkeypatch.setattr(config, "cpu_kernel", "chunked" if kernel == "cuda" else kernel)
    dev = "cuda" if kernel == "cuda" else "cpu"
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 2, 24, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dev).requires_grad_() for _ in range(3))
    visible = torch.ones(N, N, dtype=torch.bool).tril().expand(B, 1, N, N).clone()
    visible[1, :, :, :5] = False  # batch 1 is left-padded: its first 5 rows see no key at all
    mask = torch.zeros(B, 1, N, N).masked_fill(~visible, torch.finfo(torch.float32).min).to(dev)
    dout = torch.randn(B, H, N, D, generator=g).to(dev)

    eager = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v
    want = torch.autograd.grad(eager, (q, k, v), dout)
    program = ScoreProgram((ScoreOp("scale", None, 0.25), ScoreOp("bias", 0))).encode()
    out = torch.ops.flashfx.attention(q, k, v, [mask], program)[0]
    got = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    # the dead rows' outputs are the mean of all values, as in eager, not 0
    torch.testing.assert_close(out[1, :, :5], v[1].mean(-2, keepdim=True).expand(H, 5, D), rtol=1e-4, atol=1e-5)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_kernel_ops_compute_the_op_and_carry_no_gradient():
    # the ops inductor's graphs call (ops.KERNEL_OPS): the same outputs, but no autograd, which
    # torch says at backward instead of passing a gradient
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64) for _ in range(4))
    enc = ScoreProgram((ScoreOp("scale", None, 0.25),), "top_left").encode()
    out, stats = torch.ops.flashfx.attention.default(q, k, v, [], enc)
    kout, kstats = torch.ops.flashfx.attention_kernel.default(q, k, v, [], enc)
    assert torch.equal(out, kout) and torch.equal(stats, kstats)
    grads = torch.ops.flashfx.attention_backward.default(do, q, k, v, out, stats, [], enc, [])
    kgrads = torch.ops.flashfx.attention_backward_kernel.default(do, q, k, v, out, stats, [], enc, [])
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], kgrads[:3]))
    qg = q.clone().requires_grad_()
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        torch.ops.flashfx.attention_kernel.default(qg, k, v, [], enc)[0].sum().backward()
    assert qg.grad is None


@pytest.mark.parametrize("q_shape, k_shape, v_shape, dtypes, message", [
    ((2, 4, 8, 16), (2, 4, 8), (2, 4, 8), None, "must be 4-D"),
    ((2, 4, 8, 16), (2, 4, 8, 32), (2, 4, 8, 32), None, "head dims of q, k, v differ"),
    ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 9, 16), None, "do not fit"),
    ((2, 4, 8, 16), (3, 4, 8, 16), (3, 4, 8, 16), None, "do not fit"),
    ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16), (torch.float32, torch.float16, torch.float32), "dtypes differ"),
    ((2, 6, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16), None, "cannot share"),
    ((1, 1, 4, 288), (1, 1, 4, 288), (1, 1, 4, 288), None, "outside 1..256"),
])
def test_bad_shapes_and_dtypes_get_a_clear_error(q_shape, k_shape, v_shape, dtypes, message):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.randn(s, dtype=d) for s, d in zip((q_shape, k_shape, v_shape), dtypes))
    with pytest.raises(ValueError, match=message):
        torch.ops.flashfx.attention(q, k, v, [], ScoreProgram().encode())


def test_accepted_shapes_pass_the_checks():
    # GQA (8 query heads on 2 K/V heads), cross attention (Nq != Nk), head dims 1 and 256
    for q_shape, k_shape in (((2, 8, 5, 16), (2, 2, 7, 16)), ((1, 2, 3, 1), (1, 2, 4, 1)),
                             ((1, 1, 2, 256), (1, 1, 2, 256))):
        q, k = torch.randn(q_shape), torch.randn(k_shape)
        ops.check_inputs(q, k, torch.randn(k_shape))
