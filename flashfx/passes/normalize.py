"""Canonical forms, so the matcher sees one spelling of each operation.

Dynamo records what the user wrote: `s.softmax(-1)` is a call_method, `F.softmax(s, -1)` a
call_function, `q @ k` is operator.matmul. `normalize` rewrites method calls into their
function form (exactly the same computation), and `canon` names every alias of an op.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

# call_function targets -> canonical name
_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    torch.baddbmm: "baddbmm",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    # in-place forms on the scores (`scores += bias`): the scores have no other user, so
    # computing them out of place inside the kernel is the same result
    operator.iadd: "add", operator.imul: "mul", operator.itruediv: "div",
    torch.softmax: "softmax", F.softmax: "softmax", torch.nn.functional.softmax: "softmax",
    torch.transpose: "transpose", torch.permute: "permute",
    torch.masked_fill: "masked_fill", torch.where: "where",
    F.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    operator.invert: "not", torch.logical_not: "not",
    torch.tanh: "tanh", torch.repeat_interleave: "repeat_interleave",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten", torch.unflatten: "unflatten",
    torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp", torch.clamp_max: "clamp",
}

# call_method names -> the function computing the same thing
_METHODS = {
    "matmul": torch.matmul, "bmm": torch.bmm, "baddbmm": torch.baddbmm, "mul": torch.mul, "div": torch.div,
    "add": torch.add, "softmax": torch.softmax, "transpose": torch.transpose,
    "permute": torch.permute, "masked_fill": torch.masked_fill, "eq": torch.eq, "ne": torch.ne,
    "logical_not": torch.logical_not, "tanh": torch.tanh,
    "repeat_interleave": torch.repeat_interleave, "unsqueeze": torch.unsqueeze, "sub": torch.sub,
    "clamp": torch.clamp, "clip": torch.clip, "clamp_min": torch.clamp_min, "clamp_max": torch.clamp_max,
}

# call_method names that only change the dtype of a float tensor
CASTS = {"float", "half", "bfloat16", "double", "to", "type", "type_as"}


def is_float_cast(node: fx.Node) -> bool:
    """x.float() / x.to(torch.float32) / x.type_as(y): a dtype change and nothing else."""
    if node.op != "call_method" or node.target not in CASTS:
        return False
    if node.target in ("float", "half", "bfloat16", "double"):
        return len(node.args) == 1 and not node.kwargs
    if node.target == "type_as":
        return len(node.args) == 2
    args = list(node.args[1:]) + list(node.kwargs.values())
    return len(args) == 1 and isinstance(args[0], torch.dtype) and args[0].is_floating_point


def canon(node: fx.Node) -> str | None:
    """The canonical name of the op `node` computes, or None if it is not one we know."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in _METHODS:
        return _FUNCTIONS.get(_METHODS[node.target])
    return None


def _einsum_as_matmul(equation: str) -> bool | None:
    """For a two-operand batched-matmul einsum: whether it is a @ bᵀ (True) or a @ b (False).

    "bhqd,bhkd->bhqk" is q @ kᵀ, "bhqk,bhkd->bhqd" is p @ v; anything else: None.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (len(a) == len(b) == len(out) >= 2) or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    i, j = a[-2], a[-1]
    if b[-2:] == b[-2] + j and out[-2:] == i + b[-2] and b[-2] not in (i, j):
        return True  # ...ij,...kj->...ik
    if b[-2] == j and out[-2:] == i + b[-1] and b[-1] not in (i, j):
        return False  # ...ij,...jk->...ik
    return None


def normalize(gm: fx.GraphModule) -> int:
    """Turn known method calls into function calls, and matmul-shaped einsums into matmuls.

    Returns how many nodes changed.
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.einsum and len(node.args) == 3 and isinstance(node.args[0], str):
            transposed = _einsum_as_matmul(node.args[0])
            if transposed is None:
                continue
            a, b = node.args[1], node.args[2]
            with gm.graph.inserting_before(node):
                if transposed:
                    bt = gm.graph.call_function(torch.transpose, (b, -2, -1))
                    val = b.meta.get("example_value")
                    if isinstance(val, torch.Tensor):  # fake tensors compute their own metadata
                        bt.meta["example_value"] = val.transpose(-2, -1)
                    b = bt
                node.target, node.args = torch.matmul, (a, b)
            changed += 1
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in _METHODS:
            node.op = "call_function"
            node.target = _METHODS[node.target]
            changed += 1
    for node in gm.graph.nodes:
        # x.permute(0, 2, 1, 3) passes dims as varargs; torch.permute wants a list
        if node.target is torch.permute and len(node.args) > 2:
            node.args = (node.args[0], list(node.args[1:]))
    if changed:
        gm.graph.lint()
    return changed
