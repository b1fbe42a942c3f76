"""Find attention sites by structure: QKᵀ → score program → softmax(-1) → [dropout] → @V.

The matcher anchors on each softmax (and each SDPA call), walks back through elementwise
ops on the scores to the QKᵀ matmul, and forward to the PV matmul. Every elementwise step
becomes score-program ops through the pattern registry (`passes/patterns.py`); anything else
stops the walk with a reason. A match returns an `AttentionSite`: fused when `reason` is None,
otherwise a record that explains itself.

Layouts. Models view the scores in more than one shape: BLOOM computes them as [B·H, Nq, Nk]
with baddbmm, views them as [B, H, Nq, Nk] for the mask and the softmax, and back to [B·H, ...]
for bmm with V. Views that keep the last two dims and only split or merge the leading
(batch, head) dims are layout, not computation: the site gets one canonical [B, H] split, and
q, k, v and the operands each get a `View` recipe that takes them there (the op's layout).

Semantic checks (shapes, dtypes, other users of intermediates) read `node.meta`.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from flashfx import config, scoreops
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.passes import patterns
from flashfx.passes.normalize import canon, is_float_cast

MASK_FILL_MAX = -1e4  # a fill value at or below this is a mask (-inf, finfo.min, -10000)
_QK = ("matmul", "baddbmm")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- layout recipes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """Steps from a tensor as the user's graph holds it to the layout the op wants, in order.

    ("unflatten", (b, h)): [B·H, ...] -> [B, H, ...] (one of b, h is -1)
    ("flatten",):          [B, H, ...] -> [B·H, ...]
    ("transpose",):        swap the last two dims
    ("cast", dtype):       a dtype change (a bool mask added to the scores counts as 0/1)
    """

    steps: tuple = ()

    def then(self, *step) -> "View":
        return View(self.steps + (step,))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = _STEP_FNS[step[0]](x, *step[1:])
        return x

    def emit(self, g: fx.Graph, node: fx.Node) -> fx.Node:
        for step in self.steps:
            if step[0] == "cast":
                node = g.call_method("to", (node, step[1]))
            else:
                node = g.call_function(*_STEP_CALLS[step[0]](node, *step[1:]))
        return node

    def shape(self, shape: tuple) -> tuple:
        shape = tuple(shape)
        for step in self.steps:
            if step[0] == "unflatten":
                b, h = step[1]
                n = shape[0]
                shape = ((n // h if b == -1 else b), (n // b if h == -1 else h)) + shape[1:]
            elif step[0] == "flatten":
                shape = (shape[0] * shape[1],) + shape[2:]
            elif step[0] == "transpose":
                shape = shape[:-2] + (shape[-1], shape[-2])
        return shape


_STEP_FNS = {
    "unflatten": lambda x, bh: x.unflatten(0, bh),
    "flatten": lambda x: x.flatten(0, 1),
    "transpose": lambda x: x.transpose(-2, -1),
    "cast": lambda x, dtype: x.to(dtype),
}
_STEP_CALLS = {
    "unflatten": lambda n, bh: (torch.unflatten, (n, 0, bh)),
    "flatten": lambda n: (torch.flatten, (n, 0, 1)),
    "transpose": lambda n: (torch.transpose, (n, -2, -1)),
}


@dataclass(frozen=True)
class Operand:
    """A tensor the score program reads: a graph node and the view that makes it broadcast
    against the op's [B, H, Nq, Nk] scores."""

    node: fx.Node
    view: View = View()

    @property
    def name(self) -> str:
        return self.node.name


# ---- the site record ---------------------------------------------------------------------------


@dataclass
class AttentionSite:
    """One attention found in the graph, fused or not."""

    kind: str  # "matmul" (QKᵀ-softmax-PV written out) or "sdpa"
    anchor: fx.Node  # the softmax or the SDPA call
    location: str  # user's file:line
    reason: str | None = None  # why not fused; None when fused
    output: fx.Node | None = None  # the node whose value the fused op replaces
    q: fx.Node | None = None
    k: fx.Node | None = None  # k as [..., Nk, D], or Kᵀ when k_transposed
    v: fx.Node | None = None
    k_transposed: bool = False
    gqa: bool = False  # k and v were written with their heads repeated (repeat_kv)
    program: ScoreProgram = field(default_factory=ScoreProgram)
    operands: list = field(default_factory=list)  # Operands the program's ops index
    notes: list = field(default_factory=list)
    q_shape: tuple = ()  # [B, H, Nq, D] as the op sees q
    k_shape: tuple = ()  # [B, Hk, Nk, D]
    dtype: torch.dtype | None = None
    q_view: View = View()  # q, k, v from the user's layout to the op's [B, H, N, D]
    k_view: View = View()
    v_view: View = View()
    out_view: View = View()  # the op's [B, H, Nq, D] output back to the user's layout

    @property
    def fused(self) -> bool:
        return self.reason is None

    def __bool__(self) -> bool:
        return self.fused

    def reject(self, reason: str) -> "AttentionSite":
        self.reason = reason
        return self


def _val(node):
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def location(node: fx.Node) -> str:
    """file:line of the user's code that made `node` (the innermost frame of its trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return "<unknown>"
    path, line = frames[-1]
    return f"{path}:{line}"


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _dim_arg(node, pos, name, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _known(x) -> bool:
    return isinstance(x, int) or not isinstance(x, torch.SymInt)


def _eq(a, b) -> bool:
    """a == b, decided without adding shape guards (symbolic sizes compare by expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _shape(node) -> tuple | None:
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# ---- what carries the scores -------------------------------------------------------------------


def _scores_shaped(node, nq, nk) -> bool:
    """A call whose value ends in the scores' [Nq, Nk] dims."""
    s = _shape(node)
    return (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and s is not None
            and len(s) >= 2 and _eq(s[-2], nq) and _eq(s[-1], nk))


def _score_source(node, nq, nk, found, depth: int = 16) -> bool:
    """Does a chain of score-shaped calls lead back from `node` to a node `found` accepts (a
    QKᵀ matmul, or a graph input)? The chain's nodes and the found one end in [Nq, Nk]."""
    seen, todo = set(), [(node, depth)]
    while todo:
        n, d = todo.pop()
        s = _shape(n)
        if (not isinstance(n, fx.Node) or n in seen or d < 0 or s is None or len(s) < 2
                or not (_eq(s[-2], nq) and _eq(s[-1], nk))):
            continue
        seen.add(n)
        if found(n):
            return True
        if _scores_shaped(n, nq, nk):
            todo.extend((a, d - 1) for a in n.all_input_nodes)
    return False


def _reaches_qk(node, nq, nk) -> bool:
    """Does a chain of score-shaped values lead back from `node` to a matmul (QKᵀ)?"""
    return _score_source(node, nq, nk, lambda n: canon(n) in _QK)


def _scores_from_input(node, nq, nk) -> bool:
    """Do the scores enter the graph as an input of rank 3 or more ([B·H, Nq, Nk] or
    [B, H, Nq, Nk]): QKᵀ computed in an earlier graph?"""
    return _score_source(node, nq, nk, lambda n: n.op == "placeholder" and len(_shape(n)) >= 3)


def _feeds_pv(node: fx.Node, nq, nk, depth: int = 6) -> bool:
    """Do the probabilities (through dropout, casts, views) reach a matmul as its left side?"""
    for user in node.users:
        if canon(user) == "matmul" and user.args[0] is node:
            return True
        if depth and _scores_shaped(user, nq, nk) and _feeds_pv(user, nq, nk, depth - 1):
            return True
    return False


_LAYOUT_METHODS = {"view", "reshape", "flatten", "unflatten", "contiguous"}
_LAYOUT_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}


def _layout_input(node) -> fx.Node | None:
    """x when `node` is a view or reshape of x that keeps x's last two dims and only splits or
    merges the dims before them (so the same elements sit at the same [.., i, j]); else None."""
    if not isinstance(node, fx.Node):
        return None
    if not ((node.op == "call_method" and node.target in _LAYOUT_METHODS)
            or (node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)):
        return None
    x = node.args[0] if node.args else None
    if any(isinstance(a, torch.dtype) for a in node.args[1:]):
        return None  # x.view(dtype) reinterprets bits
    xv, nv = _val(x), _val(node)
    if not (isinstance(xv, torch.Tensor) and isinstance(nv, torch.Tensor)) or xv.dtype != nv.dtype:
        return None
    if xv.dim() < 2 or nv.dim() < 2 or not _same(tuple(xv.shape[-2:]), tuple(nv.shape[-2:])):
        return None
    if not _eq(math.prod(xv.shape[:-2]), math.prod(nv.shape[:-2])):
        return None
    return x


def _reads_only_metadata(user: fx.Node, node: fx.Node) -> bool:
    """`user` reads only the dtype or sizes of `node` (x.type_as(node), node.size())."""
    if user.op != "call_method":
        return False
    if user.target == "type_as":
        return user.args[1] is node and user.args[0] is not node
    return user.target in ("size", "dim") and user.args[0] is node


def _single_user(node: fx.Node) -> bool:
    """One user of the value itself; users of its dtype or size alone do not count."""
    return sum(not _reads_only_metadata(u, node) for u in node.users) == 1


def _used_only_by(node: fx.Node, inside: set) -> bool:
    """One user, or only users among `inside` (a pattern that reads the scores twice, as
    sign(s) * log1p(abs(s)) does)."""
    users = [u for u in node.users if not _reads_only_metadata(u, node)]
    return len(users) == 1 or (bool(users) and all(u in inside for u in users))


# ---- numbers known while compiling -------------------------------------------------------------

_CONST_FUNCTIONS = {
    torch.tensor, torch.full, torch.scalar_tensor, torch.as_tensor, torch.ones, torch.zeros,
    operator.mul, operator.truediv, operator.add, operator.sub, operator.neg, operator.pow,
    torch.mul, torch.div, torch.add, torch.sub, torch.neg, torch.pow, torch.sqrt, torch.rsqrt,
    torch.reciprocal, torch.exp, torch.log, torch.abs,
}
_CONST_METHODS = {
    "to", "float", "half", "bfloat16", "double", "type", "sqrt", "rsqrt", "reciprocal", "mul",
    "div", "add", "sub", "neg", "pow", "exp", "log", "abs", "clone", "detach",
}


def constant_value(node, limit: int = 16) -> float | None:
    """The number a one-element tensor holds when it is computed from literals alone
    (`torch.tensor(finfo.min)`, `torch.full([], 8.0)`, `torch.tensor(d).sqrt()`), else None.
    Sizes, inputs and buffers are not constants here: a scale from a symbolic size stays an
    operand, so one compile serves every size."""
    v = _val(node)
    if not isinstance(node, fx.Node) or not isinstance(v, torch.Tensor) or v.dtype == torch.bool:
        return None
    try:
        if v.numel() != 1:
            return None
    except Exception:  # noqa: BLE001 - a symbolic numel: not a constant
        return None
    cone, todo = [], [node]
    while todo:
        n = todo.pop()
        if n in cone:
            continue
        ok = (n.op == "call_function" and n.target in _CONST_FUNCTIONS) or (n.op == "call_method" and n.target in _CONST_METHODS)
        if not ok or len(cone) >= limit:
            return None
        cone.append(n)
        todo.extend(n.all_input_nodes)
    memo = {}

    def run(n):
        if not isinstance(n, fx.Node):
            return n
        if n not in memo:
            args, kwargs = fx.node.map_arg(n.args, run), fx.node.map_arg(n.kwargs, run)
            memo[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
        return memo[n]

    try:
        with torch.no_grad():
            out = run(node)
        return float(out) if isinstance(out, torch.Tensor) and out.numel() == 1 else None
    except Exception:  # noqa: BLE001 - anything odd: not a constant
        return None


def _scalar_like(x) -> bool:
    """A number, a symbolic size, or a one-element tensor: it scales every score alike."""
    if _number(x) is not None:
        return True
    v = _val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return True
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool


def _peel_scales(node):
    """x and its scale steps when `node` is x * c or x / c with c a scalar (e.g. k.T / sqrt(d)
    before the matmul): (q·c) @ kᵀ = c·(q @ kᵀ), so c joins the score program instead."""
    steps = []
    while isinstance(node, fx.Node) and canon(node) in ("mul", "div") and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if canon(node) == "mul" and _scalar_like(a) and not _scalar_like(b):
            a, b = b, a
        if not isinstance(a, fx.Node) or not _scalar_like(b):
            break
        if isinstance(_val(b), torch.Tensor) and _val(b).requires_grad:
            break  # a learned temperature: its gradient flows through q (or k) as written
        c = _number(b) if not isinstance(b, fx.Node) else constant_value(b)
        if c is not None:
            if canon(node) == "div" and c == 0:
                break
            steps.append(("scale", c if canon(node) == "mul" else 1.0 / c, None))
        else:
            steps.append(("mul_x" if canon(node) == "mul" else "div_x", None, b))
        node = a
    return node, steps


def _peel_upcasts(q, k, vv):
    """q and k under a cast to fp32 from v's lower precision (GPT-J, GPT-Neo keep QKᵀ in fp32).

    Products of fp16/bf16 numbers are exact in fp32 and the kernels accumulate QKᵀ in fp32, so
    reading the narrow q and k computes the same scores, and q, k, v share one dtype again."""
    def source(x):
        if isinstance(x, fx.Node) and is_float_cast(x) and isinstance(x.args[0], fx.Node):
            xv, sv = _val(x), _val(x.args[0])
            if isinstance(xv, torch.Tensor) and isinstance(sv, torch.Tensor) and xv.dtype == torch.float32:
                return x.args[0], sv.dtype
        return None, None

    (qs, qd), (ks, kd) = source(q), source(k)
    if qs is not None and ks is not None and qd == kd and isinstance(vv, torch.Tensor) and vv.dtype == qd != torch.float32:
        return qs, ks
    return q, k


# ---- the walk ----------------------------------------------------------------------------------


def looks_like_attention(sm: fx.Node) -> bool:
    """A softmax between two matmuls over the same [Nq, Nk] scores: worth a site (fused or not)."""
    s = _shape(sm)
    if s is None or len(s) < 2 or not sm.args:
        return False
    nq, nk = s[-2], s[-1]
    return _reaches_qk(sm.args[0], nq, nk) and _feeds_pv(sm, nq, nk)


def match_softmax(sm: fx.Node) -> AttentionSite | None:
    """The attention around softmax node `sm`, or None if `sm` is not attention at all."""
    if not looks_like_attention(sm):
        s = _shape(sm)
        if (s is not None and len(s) >= 3 and sm.args and _feeds_pv(sm, s[-2], s[-1])
                and _scores_from_input(sm.args[0], s[-2], s[-1])):
            return AttentionSite("matmul", sm, location(sm)).reject(
                "QKᵀ is in an earlier graph: the scores enter this one as an input (a graph break "
                "between the matmul and the softmax, e.g. from .item(); flashfx sees one graph at a time)")
        return None  # not attention: a router, a classifier head, a softmax over logits
    site = AttentionSite("matmul", sm, location(sm))
    sm_val = _val(sm)
    nq, nk = sm_val.shape[-2], sm_val.shape[-1]
    leads = [tuple(sm_val.shape[:-2])]  # leading (batch, head) dims of every view of the scores

    # ---- forward: softmax -> [dropout in eval, casts, views] -> @ V ----
    dim = _dim_arg(sm, 1, "dim")
    if dim is None or (dim != -1 and dim != sm_val.dim() - 1):
        return site.reject(f"softmax over dim {dim}, not the key dim")
    sm_dtype = _dim_arg(sm, 2, "dtype")
    if sm_dtype is not None and not (isinstance(sm_dtype, torch.dtype) and sm_dtype.is_floating_point):
        return site.reject(f"softmax with dtype {sm_dtype}")
    p, dropout = sm, 0.0
    while True:
        if not _single_user(p):
            return site.reject("the attention probabilities have another user (e.g. returned weights)")
        user = next(u for u in p.users if not _reads_only_metadata(u, p))
        if user.target is F.dropout:
            rate, training = _dim_arg(user, 1, "p", 0.5), _dim_arg(user, 2, "training", True)
            if training is not False and rate != 0:
                if not isinstance(rate, (int, float)) or not 0 < rate < 1 or not isinstance(training, bool):
                    return site.reject(f"dropout with p={rate!r}, training={training!r} (not constants)")
                if dropout:
                    return site.reject("two dropouts on the probabilities")
                dropout = float(rate)  # in the kernels: the same mask in forward and backward
            p = user  # off (eval mode or p=0), dropout is the identity
            continue
        if is_float_cast(user):
            p = user  # probabilities cast back to the model's dtype: the kernel casts P for PV
            continue
        if _layout_input(user) is p:
            p = user  # [B, H, Nq, Nk] viewed as [B·H, Nq, Nk] for bmm (or back)
            leads.append(tuple(_val(p).shape[:-2]))
            continue
        break
    if canon(user) != "matmul" or user.args[0] is not p:
        what = user.target if user.op != "output" else "the graph output"
        return site.reject(f"the probabilities feed {getattr(what, '__name__', what)}, not a matmul with V")
    site.output, site.v = user, user.args[1]
    pv_lead = _shape(user)[:-2]

    # ---- backward: softmax input <- score program <- QKᵀ ----
    def is_scores(n):
        return _reaches_qk(n, nq, nk)

    chain, node = [], sm.args[0]  # chain: (name, const, operand node, lead, scores dtype), output first
    inside: set = set()  # the nodes the last pattern matched: they may all read the scores
    while canon(node) not in _QK:
        if not _used_only_by(node, inside):
            return site.reject("the attention scores have another user")
        if is_float_cast(node):
            node = node.args[0]
            continue
        src = _layout_input(node)
        if src is not None:
            node = src
            leads.append(tuple(_val(node).shape[:-2]))
            continue
        m = patterns.match_at(node, is_scores, constant_value)
        if m is None:
            name = canon(node) or getattr(node.target, "__name__", node.target)
            return site.reject(f"unsupported op in the score program: {name}")
        if isinstance(m, str):
            return site.reject(m)
        if any(not _used_only_by(n, set(m.nodes)) for n in m.nodes if n is not node):
            return site.reject("the attention scores have another user")
        out_shape, in_shape = _shape(node), _shape(m.scores)
        if out_shape is None or in_shape is None or not _same(out_shape, in_shape):
            return site.reject(f"the step {m.pattern.name} broadcasts the scores to a larger shape")
        lead, dtype = tuple(out_shape[:-2]), _val(node).dtype
        for step in reversed(m.steps):
            chain.append((step.name, step.c, step.x.node if step.x is not None else None, lead, dtype))
        node, inside = m.scores, set(m.nodes)
    if not _used_only_by(node, inside):
        return site.reject("the attention scores QKᵀ have another user")
    qk = node
    qk_val = _val(qk)
    qk_lead = tuple(qk_val.shape[:-2])
    leads.append(qk_lead)

    if canon(qk) == "baddbmm":  # beta·input + alpha·(q @ kᵀ) = beta·(input + (alpha/beta)·q @ kᵀ)
        names = ("input", "batch1", "batch2")
        inp, q, kt = (_dim_arg(qk, i, n) for i, n in enumerate(names))
        alpha, beta = _number(qk.kwargs.get("alpha", 1)), _number(qk.kwargs.get("beta", 1))
        if alpha is None or beta is None:
            return site.reject("baddbmm with a tensor alpha or beta")
        if beta == 0:
            post = [("scale", alpha, None, qk_lead, qk_val.dtype)]
        else:
            post = [("scale", alpha / beta, None, qk_lead, qk_val.dtype)] if alpha != beta else []
            post.append(("bias", None, inp, qk_lead, qk_val.dtype))
            post += [("scale", beta, None, qk_lead, qk_val.dtype)] if beta != 1 else []
    else:
        q, kt = qk.args[0], qk.args[1]
        post = []

    # scalar scales written on q or on Kᵀ before the matmul; Kᵀ as k.transpose(-2, -1)
    q, q_scales = _peel_scales(q)
    kt, k_scales = _peel_scales(kt)
    kv = _val(kt)
    if canon(kt) == "transpose" and isinstance(kv, torch.Tensor) and {d % kv.dim() for d in kt.args[1:3]} == {kv.dim() - 2, kv.dim() - 1}:
        k, more = _peel_scales(kt.args[0])
        k_scales += more
    else:
        k, site.k_transposed = kt, True
    q, k = _peel_upcasts(q, k, _val(site.v))
    # (name, const, operand, lead, dtype) in the order applied: scales, baddbmm, the chain
    pre = [(n, c, x, qk_lead, qk_val.dtype) for n, c, x in q_scales + k_scales] + post

    # ---- one [B, H] split for every view, and the recipes that take each tensor there ----
    bh = _canonical_split(leads + [tuple(pv_lead)])
    if isinstance(bh, str):
        return site.reject(bh)
    try:
        site.q, site.q_view = _to_split(q, len(qk_lead), bh, operand=False)
        site.k, site.k_view = _to_split(k, len(qk_lead), bh, operand=False)
        site.v, site.v_view = _to_split(site.v, len(pv_lead), bh, operand=False)
        if site.k_transposed:  # Kᵀ written by the user: the op transposes it back
            site.k_view = View((("transpose",),) + site.k_view.steps)
        site.out_view = View((("flatten",),)) if len(pv_lead) == 1 else View()
        ops = []
        for name, const, x, lead, dtype in pre + list(reversed(chain)):
            if x is None:
                ops.append(ScoreOp(name, None, const))
                continue
            site.operands.append(_operand(x, name, lead, bh, dtype))
            ops.append(ScoreOp(name, len(site.operands) - 1, const))
    except _Unfusable as e:
        return site.reject(str(e))
    # grouped-query attention written with repeat_kv: read the shared K/V heads, no copies
    if not site.k_transposed and not site.k_view.steps and not site.v_view.steps:
        k_src, v_src = _unrepeat_heads(site.k), _unrepeat_heads(site.v)
        if k_src is not None and v_src is not None:
            site.k, site.v, site.gqa = k_src, v_src, True
    site.program = ScoreProgram(tuple(ops), dropout=dropout)
    return _check_tensors(site)


class _Unfusable(Exception):
    pass


def _canonical_split(leads: list[tuple]) -> tuple | str:
    """The (B, H) every view of the scores regroups: the 4-D view's, or (B·H, 1) when all are 3-D."""
    ranks = {len(lead) for lead in leads}
    if not ranks <= {1, 2}:
        return f"scores of rank {max(ranks) + 2} (3-D and 4-D attention are fused)"
    fours = [lead for lead in leads if len(lead) == 2]
    if fours:
        if not all(_same(lead, fours[0]) for lead in fours):
            return "the scores are viewed with two different (batch, head) splits"
        return fours[0]
    return (leads[0][0], 1)


def _split_arg(bh: tuple) -> tuple:
    b, h = bh
    if isinstance(h, int):
        return (-1, h)
    if isinstance(b, int):
        return (b, -1)
    raise _Unfusable("the scores are regrouped over a symbolic batch and head count")


def _to_split(node, lead_rank: int, bh: tuple, operand: bool):
    """(node', view) that bring a q/k/v tensor used in a space with `lead_rank` leading dims to
    [B, H, N, D]. A 3-D tensor that was itself reshaped from the canonical 4-D one is read from
    there (no copy)."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise _Unfusable("q, k or v is not a tensor with known metadata")
    if lead_rank == 2 or v.dim() != 3:
        return node, View()
    src = node
    for _ in range(4):
        src = _layout_input(src)
        sv = _val(src) if src is not None else None
        if sv is None or sv.dim() < 3:
            break
        if sv.dim() == 4 and _same(tuple(sv.shape[:2]), bh) and _same(tuple(sv.shape[2:]), tuple(v.shape[1:])):
            return src, View()
    return node, View((("unflatten", _split_arg(bh)),))


def _operand(x, name: str, lead: tuple, bh: tuple, dtype) -> Operand:
    """An operand applied to scores with leading dims `lead`, as the op's [B, H, ...] sees it."""
    xv = _val(x)
    view = View()
    if isinstance(xv, torch.Tensor):
        if len(lead) == 1 and xv.dim() == 3 and not _eq(xv.shape[0], 1):
            view = view.then("unflatten", _split_arg(bh))  # [B·H, a, b] -> [B, H, a, b]
        wants_float = name not in ("keep", "drop")
        if wants_float and not xv.is_floating_point() and not xv.is_complex():
            view = view.then("cast", dtype)  # scores + int/bool tensor: torch promotes it
    return Operand(x, view)


def _unrepeat_heads(node: fx.Node) -> fx.Node | None:
    """x when `node` repeats x's heads: [B, Hk, N, D] -> [B, Hk·n, N, D], else None.

    Forms: repeat_interleave(x, n, dim=1), and HF's repeat_kv,
    x[:, :, None, :, :].expand(B, Hk, n, N, D).reshape(B, Hk·n, N, D) (or unsqueeze(2)).
    """
    if not isinstance(node, fx.Node):
        return None
    c = canon(node)
    out = _val(node)
    if c == "repeat_interleave":
        src = node.args[0]
        dim = _dim_arg(node, 2, "dim")
        if isinstance(src, fx.Node) and _val(src) is not None and _val(src).dim() == 4 and dim in (1, -3):
            return src
        return None
    if not (c == "reshape" or (node.op == "call_method" and node.target in ("reshape", "view"))):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    unsq = expand.args[0]
    if not isinstance(unsq, fx.Node):
        return None
    if canon(unsq) == "unsqueeze" and _dim_arg(unsq, 1, "dim") == 2:
        src = unsq.args[0]
    elif unsq.op == "call_function" and unsq.target is operator.getitem and _is_none_at_2(unsq.args[1]):
        src = unsq.args[0]
    else:
        return None
    sv = _val(src)
    if sv is None or out is None or sv.dim() != 4 or out.dim() != 4:
        return None
    same = _eq(out.shape[0], sv.shape[0]) and _eq(out.shape[2], sv.shape[2]) and _eq(out.shape[3], sv.shape[3])
    return src if same else None


def _is_none_at_2(index) -> bool:
    """x[:, :, None] / x[:, :, None, :, :]: a new axis at position 2, full slices before it."""
    if not isinstance(index, tuple) or len(index) < 3 or index[2] is not None:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(i == full or i is Ellipsis for i in index[3:])


def match_sdpa(node: fx.Node) -> AttentionSite:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""
    site = AttentionSite("sdpa", node, location(node))
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    arg = {n: _dim_arg(node, i, n) for i, n in enumerate(names)}
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    site.q, site.k, site.v, site.output = arg["query"], arg["key"], arg["value"], node
    dropout = arg["dropout_p"] or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return site.reject(f"SDPA with dropout_p={dropout!r} (a constant in [0, 1) is fused)")
    mask, causal = arg["attn_mask"], bool(arg["is_causal"])
    if mask is not None and causal:
        return site.reject("SDPA with both attn_mask and is_causal (SDPA itself rejects this)")
    qv, kv = _val(site.q), _val(site.k)
    if not all(isinstance(x, torch.Tensor) for x in (qv, kv, _val(site.v))):
        return site.reject("q, k or v is not a tensor with known metadata")
    if scale is None:
        scale = 1.0 / math.sqrt(int(qv.shape[-1]))
    if _number(scale) is None:
        return site.reject(f"SDPA scale {scale!r} is not a number")
    if qv.dim() not in (3, 4):
        return site.reject(f"SDPA on rank-{qv.dim()} tensors (3-D and 4-D are fused)")
    three_d = qv.dim() == 3
    bh = (qv.shape[0], 1) if three_d else tuple(qv.shape[:2])
    to4 = View((("unflatten", (-1, 1)),)) if three_d else View()
    site.q_view = site.k_view = site.v_view = to4
    site.out_view = View((("flatten",),)) if three_d else View()
    ops = [ScoreOp("scale", None, float(scale))]
    if isinstance(mask, fx.Node):
        mv = _val(mask)
        is_bool = isinstance(mv, torch.Tensor) and mv.dtype == torch.bool
        # SDPA's boolean mask: True takes part in attention; a float mask is added
        name = "keep" if is_bool else "bias"
        site.operands.append(_operand(mask, name, bh[:1] if three_d else bh, bh, qv.dtype))
        ops.append(ScoreOp(name, 0, float("-inf")) if is_bool else ScoreOp("bias", 0, None))
    site.program = ScoreProgram(tuple(ops), "top_left" if causal else None, float(dropout))
    if qv.dim() == 4 and not _eq(kv.shape[1], qv.shape[1]) and not _eq(kv.shape[1], 1) and not gqa:
        return site.reject("SDPA with fewer K/V heads than query heads needs enable_gqa=True")
    return _check_tensors(site)


def _check_tensors(site: AttentionSite) -> AttentionSite:
    """Shapes, dtypes and devices the kernels accept; otherwise a reason."""
    qv, kv, vv = _val(site.q), _val(site.k), _val(site.v)
    if not all(isinstance(x, torch.Tensor) for x in (qv, kv, vv)):
        return site.reject("q, k or v is not a tensor with known metadata")
    qshape, kshape, vshape = site.q_view.shape(qv.shape), site.k_view.shape(kv.shape), site.v_view.shape(vv.shape)
    if not (len(qshape) == len(kshape) == len(vshape) == 4):
        return site.reject(f"q, k, v of rank {qv.dim()}, {kv.dim()}, {vv.dim()} (3-D or 4-D are fused)")
    # float64 runs on the CPU's chunked path (exact to 1e-12); the GPU kernels take 16/32-bit
    dtypes = _DTYPES + ((torch.float64,) if qv.device.type == "cpu" and config.cpu_kernel == "chunked" else ())
    if not (qv.dtype == kv.dtype == vv.dtype and qv.dtype in dtypes):
        return site.reject(f"dtypes {qv.dtype}, {kv.dtype}, {vv.dtype} (one of fp16/bf16/fp32 expected)")
    if qv.device.type not in ("cpu", "cuda") or not (qv.device == kv.device == vv.device):
        return site.reject(f"device {qv.device} is not supported")
    D = qshape[-1]
    if not (_eq(kshape[-1], D) and _eq(vshape[-1], D)):
        return site.reject(f"head dims differ: q {D}, k {kshape[-1]}, v {vshape[-1]}")
    if _known(D) and not 1 <= int(D) <= 256:
        return site.reject(f"head dim {D} outside 1..256")  # a symbolic D is checked per call
    if not _eq(kshape[-2], vshape[-2]):
        return site.reject("k and v have different sequence lengths")
    if not _eq(kshape[0], qshape[0]) or not _eq(vshape[0], qshape[0]):
        return site.reject("batch dims of q, k, v differ (broadcast batch is not fused)")
    H, Hk = qshape[1], kshape[1]
    if not _eq(vshape[1], Hk):
        return site.reject("k and v have different head counts")
    grouped = site.kind == "sdpa" or site.gqa
    if not (_eq(Hk, H) or _eq(Hk, 1) or (grouped and _known(H) and _known(Hk) and int(H) % int(Hk) == 0)):
        return site.reject(f"{H} query heads cannot share {Hk} K/V heads")
    for operand in site.operands:
        x = operand.node
        xv = _val(x)
        if isinstance(xv, (torch.SymInt, torch.SymFloat, int, float)):
            continue  # a symbolic scale: the rewrite makes it a 0-d tensor
        if not isinstance(xv, torch.Tensor):
            return site.reject(f"score operand {x} has no known metadata")
        if len(operand.view.shape(xv.shape)) > 4:
            return site.reject(f"a score operand of rank {xv.dim()} does not broadcast to the scores")
    for op in site.program.ops:
        if op.operand is None:
            continue
        xv = _val(site.operands[op.operand].node)
        if not isinstance(xv, torch.Tensor):
            continue
        if xv.requires_grad and scoreops.get(op.name).operand_grad is None:
            return site.reject(f"score operand of {op.name!r} requires grad, and that op has no operand gradient")
        want_bool = op.name in ("keep", "drop")
        if want_bool and xv.dtype != torch.bool:
            return site.reject(f"mask of dtype {xv.dtype} used as a boolean mask")
        if not want_bool and xv.is_complex():
            return site.reject(f"bias of dtype {xv.dtype} added to the scores")
    site.q_shape, site.k_shape, site.dtype = tuple(qshape), tuple(kshape), qv.dtype
    return site


def find_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention site in the graph, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        c = canon(node)
        site = match_softmax(node) if c == "softmax" else match_sdpa(node) if c == "sdpa" else None
        if site is not None:
            sites.append(site)
    return sites
