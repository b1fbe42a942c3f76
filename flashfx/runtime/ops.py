"""The flashfx custom op: one fused attention call, forward and backward.

    out, stats = torch.ops.flashfx.attention(q, k, v, operands, program, seed=None)
      q: [B, H, Nq, D]; k, v: [B, Hk, Nk, D] with H % Hk == 0 (GQA without copies)
      operands: tensors the score program reads, each broadcastable to [B, H, Nq, Nk]
      program: ScoreProgram.encode() — what happens to the scores before the softmax
      seed: a one-element int64 tensor, needed when the program has dropout: the mask is a
            function of (seed, position), so the backward regenerates it
      out: [B, H, Nq, D] in q's dtype
      stats: [P, B, H, Nq] fp32 (fp64 for fp64 inputs), P = program.stats_planes: for a
             positive scale and infinite masks the log-sum-exp of the final scores; otherwise
             their row max and log Σ exp(s - max), whose sum is the log-sum-exp (-inf for rows
             with no visible key)

Autograd saves q, k, v, out and stats — O(N) — and the backward op recomputes the
probabilities from them. CUDA tensors run the generated Triton kernels; CPU tensors the
chunked path (or, for tests, the Triton kernels under the interpreter).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flashfx import config, scoreops
from flashfx.ir import ScoreProgram
from flashfx.runtime import cpu, gpu


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shapes the op accepts, checked before any kernel runs."""
    qs, ks = q.shape, k.shape
    # every call checks: the common case in one expression, the messages below on a failure
    if (len(qs) == 4 and len(ks) == 4 and v.shape == ks and qs[0] == ks[0] and qs[3] == ks[3]
            and 1 <= qs[3] <= 256 and ks[1] and not qs[1] % ks[1] and q.dtype == k.dtype == v.dtype):
        return
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"flashfx: q, k, v must be 4-D [B, H, N, D], got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    B, H, Nq, D = q.shape
    Bk, Hk, Nk, Dk = k.shape
    if Dk != D or v.shape[-1] != D:
        raise ValueError(f"flashfx: head dims of q, k, v differ: {D}, {Dk}, {v.shape[-1]}")
    if v.shape != k.shape or Bk != B:
        raise ValueError(f"flashfx: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flashfx: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if H % Hk:
        raise ValueError(f"flashfx: {H} query heads cannot share {Hk} K/V heads")
    if not 1 <= D <= 256:
        raise ValueError(f"flashfx: head dim {D} is outside 1..256")


def _broadcast_operands(operands, q, k) -> list[Tensor]:
    """Views of each operand broadcast to [B, H, Nq, Nk] (stride 0 on broadcast dims)."""
    if not operands:
        return []
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    views = []
    for x in operands:
        if x.dim() > 4:
            raise ValueError(f"flashfx: a score operand has {x.dim()} dims; at most 4 broadcast to [B, H, Nq, Nk]")
        x4 = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
        try:
            views.append(x4.expand(B, H, Nq, Nk))
        except RuntimeError:
            raise ValueError(
                f"flashfx: score operand of shape {tuple(x.shape)} does not broadcast to "
                f"[B, H, Nq, Nk] = {[B, H, Nq, Nk]}"
            ) from None
    return views


def uses_triton(q: Tensor) -> bool:
    """Whether calls on tensors like `q` run the generated Triton kernels."""
    return q.is_cuda or (config.cpu_kernel == "triton" and gpu.interpreting())


# ---- registration -----------------------------------------------------------------------
#
# The ops are defined through torch.library.Library with one kernel per dispatch key, not
# torch.library.custom_op: a compiled graph calls them once per layer and step, and custom_op's
# Python layers (autograd wrapper, redispatch, alias checks, a Dynamo-disabling wrapper) cost
# about as much host time per call as the rest of the op. Here a call is: the Autograd kernel
# (one check, then straight below autograd) and the backend kernel.

_lib = torch.library.Library("flashfx", "DEF")
# pt2_compliant: the ops trace under torch.compile (fake kernels, no hidden state), as
# custom_op marks its ops
_TAGS = (torch.Tag.pt2_compliant_tag,)
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor[] operands, str program, Tensor? seed=None)"
            " -> (Tensor, Tensor)", tags=_TAGS)
_lib.define("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats,"
            " Tensor[] operands, str program, SymInt[] grad_operands, Tensor? seed=None)"
            " -> (Tensor, Tensor, Tensor, Tensor[])", tags=_TAGS)


def attention(
    q: Tensor, k: Tensor, v: Tensor, operands: list[Tensor], program: str, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v)
    prog = ScoreProgram.decode(program)
    _check_seed(prog, seed)
    xs = _broadcast_operands(operands, q, k)
    if uses_triton(q):
        return gpu.forward(q, k, v, xs, prog, seed=seed)
    return cpu.attention_forward(q, k, v, xs, prog, seed=_seed_value(seed))


def _check_seed(prog: ScoreProgram, seed) -> None:
    if prog.dropout and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError("flashfx: a program with dropout needs `seed`, a one-element int64 tensor")


def _seed_value(seed) -> int | None:
    return None if seed is None else int(seed.reshape(()).item())


def _attention_fake(q, k, v, operands, program, seed=None):
    B, H, Nq, D = q.shape
    torch._check(k.shape[-1] == D and v.shape[-1] == D, lambda: "flashfx: q, k, v head dims differ")
    stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    planes = ScoreProgram.decode(program).stats_planes
    return torch.empty_like(q), q.new_empty((planes, B, H, Nq), dtype=stats_dtype)


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
    operands: list[Tensor], program: str, grad_operands: list[int], seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(dq, dk, dv, [dL/d operands[i] for i in grad_operands]); each operand gradient has the
    operand's shape and dtype (summed over the dimensions it broadcasts along)."""
    prog = ScoreProgram.decode(program)
    xs = _broadcast_operands(operands, q, k)
    shapes = {i: _shape4(operands[i]) for i in grad_operands}
    if uses_triton(q):
        dq, dk, dv, d_ops = gpu.backward(dout, q, k, v, out, stats, xs, prog, operand_grads=shapes, seed=seed)
    else:
        dq, dk, dv, d_ops = cpu.attention_backward(dout, q, k, v, out, stats, xs, prog, operand_grads=shapes,
                                                   seed=_seed_value(seed))
    grads = [d_ops[i].reshape(operands[i].shape).to(operands[i].dtype) for i in grad_operands]
    return dq, dk, dv, grads


def _shape4(x: Tensor) -> tuple:
    return (1,) * (4 - x.dim()) + tuple(x.shape)


def _attention_backward_fake(dout, q, k, v, out, stats, operands, program, grad_operands, seed=None):
    grads = [operands[i].new_empty(operands[i].shape) for i in grad_operands]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grads


class _Attention(torch.autograd.Function):
    """The op's autograd: saves q, k, v, out, stats (O(N)); the backward op recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, program, seed, *operands):
        with torch._C._AutoDispatchBelowAutograd():
            out, stats = torch.ops.flashfx.attention.default(q, k, v, list(operands), program, seed)
        ctx.grad_operands = [i for i, x in enumerate(operands) if x.requires_grad]
        if ctx.grad_operands:
            prog = ScoreProgram.decode(program)
            for op in prog.ops:
                if op.operand in ctx.grad_operands and scoreops.get(op.name).operand_grad is None:
                    raise NotImplementedError(
                        f"flashfx: score operand {op.operand} requires grad, but score op {op.name!r} "
                        "has no gradient for its operand")
        ctx.save_for_backward(q, k, v, out, stats, seed, *operands)
        ctx.program = program
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, dout, dstats):
        q, k, v, out, stats, seed, *operands = ctx.saved_tensors
        dq, dk, dv, grads = torch.ops.flashfx.attention_backward.default(
            dout, q, k, v, out, stats, operands, ctx.program, ctx.grad_operands, seed)
        d_operands = [None] * len(operands)
        for i, g in zip(ctx.grad_operands, grads):
            d_operands[i] = g
        return (dq, dk, dv, None, None, *d_operands)


def _attention_autograd(q, k, v, operands, program, seed=None):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or any(x.requires_grad for x in operands)):
        return _Attention.apply(q, k, v, program, seed, *operands)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.flashfx.attention.default(q, k, v, operands, program, seed)


def _attention_backward_autograd(dout, q, k, v, out, stats, operands, program, grad_operands, seed=None):
    # a gradient of the backward (create_graph=True, double backward) is not implemented: say so
    # rather than let autograd's fallback return a wrong one
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dout, q, k, v, out, *operands)):
        raise NotImplementedError("flashfx: the fused attention's backward is not differentiable "
                                  "(double backward, e.g. autograd.grad(..., create_graph=True))")
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.flashfx.attention_backward.default(dout, q, k, v, out, stats, operands, program,
                                                            grad_operands, seed)


_lib.impl("attention", attention, "CompositeExplicitAutograd")
_lib.impl("attention_backward", attention_backward, "CompositeExplicitAutograd")
_lib.impl("attention", _attention_autograd, "Autograd")
_lib.impl("attention_backward", _attention_backward_autograd, "Autograd")
torch.library.register_fake("flashfx::attention", _attention_fake, lib=_lib)
torch.library.register_fake("flashfx::attention_backward", _attention_backward_fake, lib=_lib)

# The same two computations without an Autograd kernel, for graphs autograd has already been
# traced out of: inductor's forward and backward graphs, which run with gradients off. There
# the Autograd kernel above only checks and dispatches again, a second trip from the
# dispatcher into Python per call. flashfx's inductor pass (backend.RuntimeVersion) calls
# these instead. They are not for autograd: called with gradients needed, torch's fallback
# warns at backward and no gradient reaches the inputs (tests/runtime/test_ops.py).
KERNEL_OPS = {}  # op name -> its kernel op's name
for _name, _impl, _fake in (("attention", attention, _attention_fake),
                            ("attention_backward", attention_backward, _attention_backward_fake)):
    _schema = str(getattr(torch.ops.flashfx, _name).default._schema)
    KERNEL_OPS[_name] = _name + "_kernel"
    _lib.define(KERNEL_OPS[_name] + _schema[_schema.index("("):], tags=_TAGS)
    _lib.impl(KERNEL_OPS[_name], _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"flashfx::{KERNEL_OPS[_name]}", _fake, lib=_lib)
