"""Find attention sites by structure: QKᵀ → score program → softmax(-1) → [dropout] → @V.

The matcher anchors on each softmax (and each SDPA call), walks back through elementwise
ops on the scores to the QKᵀ matmul, and forward to the PV matmul. Every elementwise step
becomes a score-program op; anything else stops the walk with a reason. A match returns an
`AttentionSite`: fused when `reason` is None, otherwise a record that explains itself.

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

from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.passes.normalize import canon, is_float_cast

MASK_FILL_MAX = -1e4  # a fill value at or below this is a mask (-inf, finfo.min, -10000)
_SCORE_OPS = {"mul", "div", "add", "masked_fill", "where", "tanh"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    operands: list = field(default_factory=list)  # nodes the program's ops index
    notes: list = field(default_factory=list)
    q_shape: tuple = ()
    k_shape: tuple = ()
    dtype: torch.dtype | None = None

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


def _reaches_qk(node, depth: int = 12) -> bool:
    """Does a chain of score ops lead back from `node` to a matmul?"""
    while depth > 0 and isinstance(node, fx.Node):
        c = canon(node)
        if c in ("matmul", "baddbmm"):
            return True
        if c not in _SCORE_OPS and not is_float_cast(node):
            return False
        node = next((a for a in node.args if isinstance(a, fx.Node) and _reaches_qk(a, depth - 1)), None)
        depth -= 1
    return False


def _feeds_pv(node: fx.Node, depth: int = 4) -> bool:
    """Do the probabilities (possibly through dropout/casts) reach a matmul as its left side?"""
    for user in node.users:
        if canon(user) == "matmul" and user.args[0] is node:
            return True
        if depth and user.op in ("call_function", "call_method") and canon(user) is None and _feeds_pv(user, depth - 1):
            return True
    return False


def _score_step(node: fx.Node):
    """One elementwise step on the scores: (op name, const, operand node, scores node) or a reason.

    The op name is None for a step that changes nothing the kernels compute (a float cast:
    they hold scores in fp32 throughout).
    """
    c = canon(node)
    args = list(node.args)
    if is_float_cast(node):
        return (None, None, None, args[0])
    if c == "tanh":
        return ("tanh", None, None, args[0])
    if c in ("mul", "div"):
        a, b = args[0], args[1]
        if c == "mul" and (not isinstance(a, fx.Node) or (isinstance(b, fx.Node) and not _reaches_qk(a))):
            a, b = b, a
        if isinstance(b, fx.Node):  # a scale held in a tensor or a symbolic size: an operand
            if c == "div" and node.kwargs.get("rounding_mode") is not None:
                return "division with a rounding mode"
            return ("mul_x" if c == "mul" else "div_x", None, b, a)
        k = _number(b)
        if k is None:
            return f"scale by {b!r} is not supported"
        if c == "div":
            if k == 0:
                return "division of the scores by zero"
            if node.kwargs.get("rounding_mode") is not None:
                return "division with a rounding mode"
            k = 1.0 / k
        return ("scale", k, None, a)
    if c == "add":
        if node.kwargs.get("alpha", 1) != 1:
            return "add with alpha"
        a, b = args[0], args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return "adding a constant to the scores (a no-op for softmax) is not matched"
        if not _reaches_qk(a):
            a, b = b, a
        return ("bias", None, b, a)
    if c == "masked_fill":
        s, mask, value = args[0], args[1], (args[2] if len(args) > 2 else node.kwargs.get("value"))
        v = _number(value)
        if v is None or v > MASK_FILL_MAX:
            return f"masked_fill with value {value!r} (only large negative fills are masks)"
        return ("drop", v, mask, s)
    if c == "where":
        cond, a, b = args[0], args[1], args[2]
        if _number(b) is not None and _number(b) <= MASK_FILL_MAX and isinstance(a, fx.Node):
            return ("keep", _number(b), cond, a)
        if _number(a) is not None and _number(a) <= MASK_FILL_MAX and isinstance(b, fx.Node):
            return ("drop", _number(a), cond, b)
        return "torch.where that is not a mask with a large negative fill"
    return None


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


def match_softmax(sm: fx.Node) -> AttentionSite | None:
    """The attention around softmax node `sm`, or None if `sm` is not attention at all."""
    site = AttentionSite("matmul", sm, location(sm))
    scores = sm.args[0]
    if not (_reaches_qk(scores) and _feeds_pv(sm)):
        return None  # not attention: a router, a classifier head, a softmax over logits

    # ---- forward: softmax -> [dropout in eval] -> @ V ----
    sm_val = _val(sm)
    dim = _dim_arg(sm, 1, "dim")
    if dim is None or (dim != -1 and sm_val is not None and dim != sm_val.dim() - 1):
        return site.reject(f"softmax over dim {dim}, not the key dim")
    sm_dtype = _dim_arg(sm, 2, "dtype")
    if sm_dtype is not None and not (isinstance(sm_dtype, torch.dtype) and sm_dtype.is_floating_point):
        return site.reject(f"softmax with dtype {sm_dtype}")
    p = sm
    while True:
        if not _single_user(p):
            return site.reject("the attention probabilities have another user (e.g. returned weights)")
        user = next(u for u in p.users if not _reads_only_metadata(u, p))
        if user.target is F.dropout and (_dim_arg(user, 2, "training", True) is False or _dim_arg(user, 1, "p", 0.5) == 0):
            p = user  # dropout that is off (eval mode or p=0) is the identity
            continue
        if is_float_cast(user):
            p = user  # probabilities cast back to the model's dtype: the kernel casts P for PV
            continue
        break
    if canon(user) != "matmul" or user.args[0] is not p:
        what = user.target if user.op != "output" else "the graph output"
        return site.reject(f"the probabilities feed {getattr(what, '__name__', what)}, not a matmul with V")
    site.output, site.v = user, user.args[1]

    # ---- backward: softmax input <- score program <- QKᵀ ----
    steps, node = [], scores
    while canon(node) not in ("matmul", "baddbmm"):
        step = _score_step(node)
        if step is None:
            return site.reject(f"unsupported op in the score program: {node.target}")
        if isinstance(step, str):
            return site.reject(step)
        if not _single_user(node):
            return site.reject("the attention scores have another user")
        if step[0] is not None:
            steps.append(step[:3])
        node = step[3]
    if not _single_user(node):
        return site.reject("the attention scores QKᵀ have another user")
    qk = node
    if canon(qk) == "baddbmm":  # beta·input + alpha·(q @ kᵀ) = beta·(input + (alpha/beta)·q @ kᵀ)
        names = ("input", "batch1", "batch2")
        inp, site.q, kt = (_dim_arg(qk, i, n) for i, n in enumerate(names))
        alpha, beta = _number(qk.kwargs.get("alpha", 1)), _number(qk.kwargs.get("beta", 1))
        if alpha is None or beta is None:
            return site.reject("baddbmm with a tensor alpha or beta")
        if beta == 0:
            steps.append(("scale", alpha, None))
        else:
            steps += [("scale", beta, None)] if beta != 1 else []
            steps.append(("bias", None, inp))
            steps += [("scale", alpha / beta, None)] if alpha != beta else []
    else:
        site.q, kt = qk.args[0], qk.args[1]

    # Kᵀ is usually written as k.transpose(-2, -1): take k itself
    kv = _val(kt)
    if canon(kt) == "transpose" and kv is not None and {d % kv.dim() for d in kt.args[1:3]} == {kv.dim() - 2, kv.dim() - 1}:
        site.k = kt.args[0]
    else:
        site.k, site.k_transposed = kt, True
    # grouped-query attention written with repeat_kv: read the shared K/V heads, no copies
    if not site.k_transposed:
        k_src, v_src = _unrepeat_heads(site.k), _unrepeat_heads(site.v)
        if k_src is not None and v_src is not None:
            site.k, site.v, site.gqa = k_src, v_src, True

    ops = []
    for name, const, operand in reversed(steps):
        if operand is not None:
            site.operands.append(operand)
            ops.append(ScoreOp(name, len(site.operands) - 1, const))
        else:
            ops.append(ScoreOp(name, None, const))
    site.program = ScoreProgram(tuple(ops))
    return _check_tensors(site)


def match_sdpa(node: fx.Node) -> AttentionSite:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""
    site = AttentionSite("sdpa", node, location(node))
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    arg = {n: _dim_arg(node, i, n) for i, n in enumerate(names)}
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    site.q, site.k, site.v, site.output = arg["query"], arg["key"], arg["value"], node
    if arg["dropout_p"] not in (None, 0, 0.0):
        return site.reject(f"SDPA with dropout_p={arg['dropout_p']} (dropout is not fused yet)")
    mask, causal = arg["attn_mask"], bool(arg["is_causal"])
    if mask is not None and causal:
        return site.reject("SDPA with both attn_mask and is_causal (SDPA itself rejects this)")
    qv = _val(site.q)
    if scale is None and qv is not None:
        scale = 1.0 / math.sqrt(int(qv.shape[-1]))
    if _number(scale) is None:
        return site.reject(f"SDPA scale {scale!r} is not a number")
    ops = [ScoreOp("scale", None, float(scale))]
    if isinstance(mask, fx.Node):
        mv = _val(mask)
        site.operands.append(mask)
        is_bool = mv is not None and mv.dtype == torch.bool
        ops.append(ScoreOp("keep", 0, float("-inf")) if is_bool else ScoreOp("bias", 0, None))
    site.program = ScoreProgram(tuple(ops), "top_left" if causal else None)
    kv = _val(site.k)
    if qv is not None and kv is not None and qv.dim() == 4 and kv.shape[1] != qv.shape[1] and not gqa:
        return site.reject("SDPA with fewer K/V heads than query heads needs enable_gqa=True")
    return _check_tensors(site)


def _known(x) -> bool:
    return isinstance(x, int) or not isinstance(x, torch.SymInt)


def _eq(a, b) -> bool:
    """a == b, decided without adding shape guards (symbolic sizes compare by expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def _check_tensors(site: AttentionSite) -> AttentionSite:
    """Shapes, dtypes and devices the kernels accept; otherwise a reason."""
    qv, kv, vv = _val(site.q), _val(site.k), _val(site.v)
    if not all(isinstance(x, torch.Tensor) for x in (qv, kv, vv)):
        return site.reject("q, k or v is not a tensor with known metadata")
    kshape = list(kv.shape)
    if site.k_transposed:
        kshape[-2], kshape[-1] = kshape[-1], kshape[-2]
    if not (qv.dim() == kv.dim() == vv.dim() and qv.dim() in (3, 4)):
        return site.reject(f"q, k, v of rank {qv.dim()}, {kv.dim()}, {vv.dim()} (3-D or 4-D are fused)")
    if not (qv.dtype == kv.dtype == vv.dtype and qv.dtype in _DTYPES):
        return site.reject(f"dtypes {qv.dtype}, {kv.dtype}, {vv.dtype} (one of fp16/bf16/fp32 expected)")
    if qv.device.type not in ("cpu", "cuda") or not (qv.device == kv.device == vv.device):
        return site.reject(f"device {qv.device} is not supported")
    D = qv.shape[-1]
    if not (_eq(kshape[-1], D) and _eq(vv.shape[-1], D)):
        return site.reject(f"head dims differ: q {D}, k {kshape[-1]}, v {vv.shape[-1]}")
    if _known(D) and not 1 <= int(D) <= 256:
        return site.reject(f"head dim {D} outside 1..256")  # a symbolic D is checked per call
    if not _eq(kshape[-2], vv.shape[-2]):
        return site.reject("k and v have different sequence lengths")
    if not _eq(kv.shape[0], qv.shape[0]) or not _eq(vv.shape[0], qv.shape[0]):
        return site.reject("batch dims of q, k, v differ (broadcast batch is not fused)")
    if qv.dim() == 4:
        H, Hk = qv.shape[1], kshape[1]
        if not _eq(vv.shape[1], Hk):
            return site.reject("k and v have different head counts")
        grouped = site.kind == "sdpa" or site.gqa
        if not (_eq(Hk, H) or _eq(Hk, 1) or (grouped and _known(H) and _known(Hk) and int(H) % int(Hk) == 0)):
            return site.reject(f"{H} query heads cannot share {Hk} K/V heads")
    for x in site.operands:
        xv = _val(x)
        if isinstance(xv, (torch.SymInt, torch.SymFloat, int, float)):
            continue  # a symbolic scale: the rewrite makes it a 0-d tensor
        if not isinstance(xv, torch.Tensor):
            return site.reject(f"score operand {x} has no known metadata")
        if xv.requires_grad:
            return site.reject("a bias or mask that requires grad (gradients for it are not fused yet)")
        if xv.dim() > qv.dim():
            return site.reject(f"a score operand of rank {xv.dim()} does not broadcast to the scores")
    for op in site.program.ops:
        if op.operand is None:
            continue
        xv = _val(site.operands[op.operand])
        if not isinstance(xv, torch.Tensor):
            continue
        want_bool = op.name in ("keep", "drop")
        if want_bool and xv.dtype != torch.bool:
            return site.reject(f"mask of dtype {xv.dtype} used as a boolean mask")
        if not want_bool and not xv.is_floating_point():
            return site.reject(f"bias of dtype {xv.dtype} added to the scores")
    site.q_shape, site.k_shape, site.dtype = tuple(qv.shape), tuple(kshape), qv.dtype
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
