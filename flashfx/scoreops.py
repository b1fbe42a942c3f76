"""The score-op registry: each elementwise op a score program may contain, declared as data.

An op says three things, once:
  torch:       how the CPU path evaluates it on a chunk of scores, s' = f(s, x, c)
  triton:      the Triton expression for the same thing, in the names `s`, `x`, `c`
  triton_grad: the Triton expression for dL/ds given `g` = dL/ds' (and `s`, `x`, `c`)
  torch_grad:  the same derivative for the CPU backward
  operand_grad, triton_operand_grad: dL/dx given g (torch, Triton), for float operands that
               may require grad (a learned relative-position bias); None: not differentiable

`x` is the op's tensor operand tile (already loaded, broadcast to the score tile), `c` its
constant. Ops that only mask (keep/drop) have derivative zero where they mask; since the
probabilities there are exactly zero, the kernels could skip it, but we keep it exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ScoreOpDef:
    name: str
    operand: str | None  # None, "float" (bias-like: added to scores) or "bool" (a mask)
    has_const: bool
    torch: Callable  # (s, x, c) -> s'
    torch_grad: Callable  # (g, s, x, c) -> dL/ds
    triton: str
    triton_grad: str
    doc: str = ""
    pad: float = 0.0  # the operand's value outside the tensor (ragged tiles): harmless for the op
    operand_grad: Callable | None = None  # (g, s, x, c) -> dL/dx, elementwise (before reduction)
    triton_operand_grad: str | None = None


_REGISTRY: dict[str, ScoreOpDef] = {}


def register_score_op(
    name: str,
    *,
    operand: str | None = None,
    has_const: bool = False,
    torch: Callable,
    torch_grad: Callable,
    triton: str,
    triton_grad: str,
    doc: str = "",
    pad: float = 0.0,
    operand_grad: Callable | None = None,
    triton_operand_grad: str | None = None,
) -> ScoreOpDef:
    """Declare a score op. Re-registering a name replaces it (so a user can override ours).

    A float operand is differentiable when both `operand_grad` (torch) and
    `triton_operand_grad` are given: dL/dx at each score, which the runtime then sums over
    the dimensions the operand broadcasts along.
    """
    if operand not in (None, "float", "bool"):
        raise ValueError(f"operand must be None, 'float' or 'bool', got {operand!r}")
    if (operand_grad is None) != (triton_operand_grad is None):
        raise ValueError("give both operand_grad and triton_operand_grad, or neither")
    if operand_grad is not None and operand != "float":
        raise ValueError("only a float operand can have a gradient")
    op = ScoreOpDef(name, operand, has_const, torch, torch_grad, triton, triton_grad, doc, pad,
                    operand_grad, triton_operand_grad)
    _REGISTRY[name] = op
    return op


def get(name: str) -> ScoreOpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"flashfx: unknown score op {name!r} (known: {known})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


_NEG_INF = float("-inf")

# s * c   (the softmax scale, folded from mul/div/sqrt forms)
register_score_op(
    "scale",
    has_const=True,
    torch=lambda s, x, c: s * c,
    torch_grad=lambda g, s, x, c: g * c,
    triton="s * c",
    triton_grad="g * c",
    doc="multiply scores by a constant",
)

# s * x, s / x   (a scale held in a tensor: 0-d, per head, or a symbolic size made a tensor)
register_score_op(
    "mul_x",
    operand="float",
    torch=lambda s, x, c: s * x,
    torch_grad=lambda g, s, x, c: g * x,
    triton="s * x",
    triton_grad="g * x",
    doc="multiply scores by a broadcastable tensor",
    pad=1.0,
    operand_grad=lambda g, s, x, c: g * s,
    triton_operand_grad="g * s",
)
register_score_op(
    "div_x",
    operand="float",
    torch=lambda s, x, c: s / x,
    torch_grad=lambda g, s, x, c: g / x,
    triton="s / x",
    triton_grad="g / x",
    doc="divide scores by a broadcastable tensor",
    pad=1.0,
    operand_grad=lambda g, s, x, c: -g * s / (x * x),
    triton_operand_grad="-g * s / (x * x)",
)

# s + x   (additive float mask or bias, broadcast to [B, H, Nq, Nk])
register_score_op(
    "bias",
    operand="float",
    torch=lambda s, x, c: s + x,
    torch_grad=lambda g, s, x, c: g,
    triton="s + x",
    triton_grad="g",
    doc="add a broadcastable float tensor (additive mask, relative-position bias)",
    operand_grad=lambda g, s, x, c: g,
    triton_operand_grad="g",
)

# where(x, s, c)   (boolean mask, True = attend: SDPA's convention; c is the fill, -inf
# unless the model fills with a finite value such as finfo.min, kept for exact semantics)
register_score_op(
    "keep",
    operand="bool",
    has_const=True,
    torch=lambda s, x, c: s.masked_fill(~x, c),
    torch_grad=lambda g, s, x, c: g.masked_fill(~x, 0.0),
    triton="tl.where(x, s, c)",
    triton_grad="tl.where(x, g, 0.0)",
    doc="boolean mask, True keeps the score, else the fill c",
)

# where(x, c, s)   (masked_fill(mask, c): True = masked out)
register_score_op(
    "drop",
    operand="bool",
    has_const=True,
    torch=lambda s, x, c: s.masked_fill(x, c),
    torch_grad=lambda g, s, x, c: g.masked_fill(x, 0.0),
    triton="tl.where(x, c, s)",
    triton_grad="tl.where(x, 0.0, g)",
    doc="boolean mask, True replaces the score by the fill c",
)

# tanh(s)   (softcapping is s / cap -> tanh -> * cap: two scale ops around this one)
register_score_op(
    "tanh",
    torch=lambda s, x, c: torch.tanh(s),
    torch_grad=lambda g, s, x, c: g * (1 - torch.tanh(s) ** 2),
    triton="(2.0 * tl.sigmoid(2.0 * s) - 1.0)",
    triton_grad="g * (1.0 - (2.0 * tl.sigmoid(2.0 * s) - 1.0) * (2.0 * tl.sigmoid(2.0 * s) - 1.0))",
    doc="hyperbolic tangent (softcapping)",
)


def apply_torch(program, s: torch.Tensor, operands, rows: slice, cols: slice) -> torch.Tensor:
    """Evaluate `program.ops` on a [B, H, rows, cols] chunk of fp32 scores (causal excluded)."""
    for op in program.ops:
        d = get(op.name)
        x = operands[op.operand][..., rows, cols] if op.operand is not None else None
        s = d.torch(s, x, op.const)
    return s


def grad_torch(program, g: torch.Tensor, s_raw: torch.Tensor, operands, rows: slice, cols: slice,
               want_operands=()):
    """dL/d(raw scores) from dL/d(program output), chaining the ops' derivatives backward.

    With `want_operands` (operand indices), returns (dL/d(raw scores), {index: dL/dx}) where
    dL/dx is per score, not yet summed over the operand's broadcast dimensions.
    """
    inputs = []  # each op's input, recomputed forward
    s = s_raw
    for op in program.ops:
        d = get(op.name)
        x = operands[op.operand][..., rows, cols] if op.operand is not None else None
        inputs.append((d, s, x, op))
        s = d.torch(s, x, op.const)
    dx = {}
    for d, s_in, x, op in reversed(inputs):
        if op.operand in want_operands:
            if d.operand_grad is None:
                raise NotImplementedError(f"flashfx: score op {op.name!r} has no gradient for its operand")
            term = d.operand_grad(g, s_in, x, op.const)
            dx[op.operand] = term + dx[op.operand] if op.operand in dx else term
        g = d.torch_grad(g, s_in, x, op.const)
    return (g, dx) if want_operands else g


# max(s, c), min(s, c)   (clamped scores: `s.clamp(min=lo, max=hi)` is clamp_min then
# clamp_max; the gradient passes where the bound is not active, ties included, as torch's)
register_score_op(
    "clamp_min",
    has_const=True,
    torch=lambda s, x, c: s.clamp_min(c),
    torch_grad=lambda g, s, x, c: g.masked_fill(s < c, 0.0),
    triton="tl.maximum(s, c)",
    triton_grad="tl.where(s < c, 0.0, g)",
    doc="clamp the scores from below at the constant c",
)
register_score_op(
    "clamp_max",
    has_const=True,
    torch=lambda s, x, c: s.clamp_max(c),
    torch_grad=lambda g, s, x, c: g.masked_fill(s > c, 0.0),
    triton="tl.minimum(s, c)",
    triton_grad="tl.where(s > c, 0.0, g)",
    doc="clamp the scores from above at the constant c",
)
