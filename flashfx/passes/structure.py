"""Mask structure: turn boolean masks known at compile time into causal structure.

A causal mask written as `torch.ones(n, n).triu(1)` in the forward, or as a slice of a tril
buffer registered on the module (nanoGPT, GPT-2), depends on nothing the caller passes. We
evaluate it once while compiling and compare it with the causal patterns; if it is one, the
mask op leaves the program and the kernels skip the blocks above the diagonal instead of
reading an N×N mask. A mask that keeps everything is dropped. Anything else stays a runtime
operand.

Module buffers count as compile-time constants here (as for inductor's freezing): a model
that rewrites its causal-mask buffer in place after compiling must recompile. A mask may also
depend on sizes (`torch.ones(n, n)` with a symbolic n under dynamic shapes): it is evaluated at
the sizes of this compile's example inputs, on the premise that a mask built from sizes alone
has the same structure at every size.
"""

from __future__ import annotations

import torch
from torch import fx

from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.passes.match import MASK_FILL_MAX, AttentionSite


def _source_name(node: fx.Node) -> str:
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return ""
    name = src.name
    return name() if callable(name) else str(name)


def _is_size(n: fx.Node) -> bool:
    """A node reading a tensor's size, not its values."""
    if n.op == "call_method" and n.target == "size":
        return True
    return n.op == "call_function" and n.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size)


def _constant_cone(node: fx.Node, limit: int = 64) -> bool:
    """Does `node` depend only on sizes, module buffers and constants (no caller values)?"""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return False
        if _is_size(n):
            continue
        if n.op == "placeholder":
            is_size = isinstance(n.meta.get("example_value"), torch.SymInt)
            if not is_size and "._buffers[" not in _source_name(n):
                return False
        elif n.op not in ("call_function", "call_method", "get_attr"):
            return False
        todo.extend(n.all_input_nodes)
    return True


def _evaluate(node: fx.Node, gm: fx.GraphModule, inputs: dict) -> torch.Tensor:
    memo: dict = {}

    def run(n):
        if not isinstance(n, fx.Node):
            return n
        if n in memo:
            return memo[n]
        if n.op == "placeholder":
            out = _concrete(inputs[n])
        elif n.op == "get_attr":
            out = gm
            for part in n.target.split("."):
                out = getattr(out, part)
        else:
            args = fx.node.map_arg(n.args, run)
            kwargs = fx.node.map_arg(n.kwargs, run)
            out = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
        memo[n] = out
        return out

    with torch.no_grad():
        return run(node)


def _concrete(x):
    """A symbolic size as the int it has in this compile's example inputs (no guard added)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return x


def _classify(visible: torch.Tensor, nq: int, nk: int) -> str | None:
    """"all", "top_left", "bottom_right" or None for a [..., nq, nk] visibility mask."""
    v = visible.expand(*visible.shape[:-2], nq, nk) if visible.shape[-2:] != (nq, nk) else visible
    flat = v.reshape(-1, nq, nk)
    first = flat[0]
    if not bool((flat == first).all()):
        return None  # differs across batch or heads: a padding mask, not structure
    if bool(first.all()):
        return "all"
    ones = torch.ones(nq, nk, dtype=torch.bool, device=first.device)
    if torch.equal(first, ones.tril(0)):
        return "top_left"
    if torch.equal(first, ones.tril(nk - nq)):
        return "bottom_right"
    return None


def resolve_static_masks(site: AttentionSite, gm: fx.GraphModule, example_inputs) -> None:
    """Replace compile-time boolean masks of `site` by causal structure where they are one."""
    if not site.fused or site.program.causal is not None:
        return
    try:
        nq, nk = _concrete(site.q_shape[-2]), _concrete(site.k_shape[-2])
    except (TypeError, AttributeError):  # an unbacked size: no example to evaluate at
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    keep_ops, operands, causal = [], [], None
    for op in site.program.ops:
        x = site.operands[op.operand] if op.operand is not None else None
        kind = None
        if op.name in ("keep", "drop") and _constant_cone(x.node):
            try:
                value = x.view.apply(_evaluate(x.node, gm, inputs))
            except Exception:  # noqa: BLE001 - anything odd: keep the mask as a runtime operand
                value = None
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                kind = _classify(value if op.name == "keep" else ~value, nq, nk)
        if kind == "all":
            site.notes.append(f"boolean mask `{x.name}` keeps every score: dropped")
            continue
        # A finite fill (finfo.min) differs from skipping only on rows that see no key at all,
        # which a causal mask has only when bottom-right aligned with Nq > Nk. A fill that is
        # not a large negative number (a mask to 0, say) is a value, not a mask: kept as is.
        empty_rows = kind == "bottom_right" and nq > nk
        is_mask = op.const is not None and op.const <= MASK_FILL_MAX
        if kind in ("top_left", "bottom_right") and causal is None and is_mask and (op.const == float("-inf") or not empty_rows):
            causal = kind
            site.notes.append(f"boolean mask `{x.name}` is causal ({kind.replace('_', '-')}): blocks above the diagonal are skipped")
            continue
        if x is not None:
            operands.append(x)
            op = ScoreOp(op.name, len(operands) - 1, op.const)
        keep_ops.append(op)
    site.operands = operands
    site.program = ScoreProgram(tuple(keep_ops), causal, site.program.dropout)

