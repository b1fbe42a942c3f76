"""Emit the Triton source of one attention site's kernels, with its score program inlined.

    emit(program) -> source text of four kernels:
      _attn_fwd        O = softmax(f(Q Kᵀ)) V, saves row statistics      grid (Nq/BM, B·H[, parts])
      _attn_fwd_combine  merges the parts of a split key range           grid (Nq/BM, B·H)
      _attn_bwd_dq     dQ: holds a Q block, streams K/V blocks; first    grid (Nq/BM, B·H)
                       writes Δ = rowsum(dO ∘ O) of its rows
      _attn_bwd_dkdv   dK, dV: holds a K/V block, streams Q blocks       grid (Nk/BN, B·Hk)
                       (launched after dQ: reads its Δ)
      (the backward's grids transposed, heads first, where cost.heads_first says so)

FLOPs: fwd 4·Nq·Nk·D per head; bwd 2.5× fwd (dV, dP, dK, dQ: 4 matmuls, + QKᵀ recompute
twice, once in each backward kernel) — no N×N tensor is ever written to memory.

Softmax uses exp2 (one instruction; exp is two). When the program is a leading scale and
infinite masks, log2(e) is folded into that scale and scores live in log2 units. Otherwise
scores stay in natural units and only differences from the row max are scaled by log2(e), so
finite fills such as finfo.min stay finite, as in eager. The forward saves row statistics in
natural-log units, as the CPU path does (ScoreProgram.stats_planes): the log-sum-exp alone for
a positive scale and infinite masks; otherwise the row max and log Σ exp(s - max) apart, since
a row whose scores are all ≈ finfo.min has a max so large that adding log Σ to it would round
the sum away.

Key blocks come in two loops: blocks every query row of the tile sees whole (no masks at all)
and the rest (the causal diagonal, the ragged end of N), where bounds and causal masks apply.

Causal programs differ in length: a query tile sees the key blocks up to its diagonal. The
forward and dQ kernels take their tiles in reverse (program 0 the last query tile), so that
the hardware, which hands programs to SMs in launch order, starts each head's longest tiles
first and the grid does not end on a few long programs. On the H200 this made N=16384 with 16
heads 5.6% faster forward and 3% backward, and moved the other shapes measured by less than
1% (docs/benchmarks.md, "Causal tiles, longest first"). dK/dV's longest programs (key block 0)
come first already.

When (query blocks × batch·heads) would leave most SMs idle, the forward splits the key range
into parts (SPLITS, a third grid axis): each part writes its unnormalized output and row
statistics, and _attn_fwd_combine weighs them by exp(part max − overall max).

Streamed tiles (K, V in the forward and dQ; Q, dO in dK/dV) are read through tensor
descriptors when the launch passes them (TMA=1: the copy engine fetches a [BN, D] box and
zero-fills rows past N and columns past D), else through masked pointer loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import importlib.util
import os
import sys
import tempfile
import textwrap
from functools import lru_cache

from flashfx import scoreops
from flashfx.ir import ScoreProgram

LOG2E = 1.4426950408889634


def _fold_log2e(program: ScoreProgram) -> tuple[list[tuple], bool]:
    """The program's ops as (name, operand, const) with log2(e) folded where exact.

    Returns (ops, folded): when not folded the kernel multiplies the result by log2(e).
    """
    ops = [(op.name, op.operand, op.const) for op in program.ops]
    if program.scale_then_infinite_masks:
        ops[0] = ("scale", None, ops[0][2] * LOG2E)
        return ops, True
    return ops, False


def _lazy_scale(ops: list[tuple], folded: bool) -> float | None:
    """The folded scale c when it can be applied late, else None: exactly the programs whose
    forward saves one plane of row statistics (ScoreProgram.stats_planes).

    A folded program is a positive scale and infinite masks; the masks commute with the
    scale, so the kernels mask the raw scores and apply c where they are used anyway: in the
    row max (max(s)·c, exact for c > 0) and in the exponent, as one fused multiply-add
    exp2(s·c - m). The backward needs no derivative lines at all: every masked score has
    p = 0, so dS = p ∘ (dP - Δ) is already 0 there, and the scale's derivative is one
    multiplication of dK and dQ at the end, not one per score.
    """
    if folded and ops[0][2] > 0:
        return ops[0][2]
    return None


# ---------------------------------------------------------------------------------------------
# Pieces of source that depend on the program
# ---------------------------------------------------------------------------------------------


def _operand_params(n: int) -> tuple[str, str]:
    """Kernel parameters for n broadcast operands: pointers, then their 4 strides each."""
    ptrs = "".join(f"X{i}, " for i in range(n))
    strides = "".join(f"sx{i}_b, sx{i}_h, sx{i}_m, sx{i}_n, " for i in range(n))
    return ptrs, strides


@dataclasses.dataclass(frozen=True)
class _Axes:
    """How a score tile lies: the broadcast query and key positions, and the suffix that
    spreads a per-query vector (row statistics, Δ) over the tile."""

    m: str
    n: str
    per_query: str


# [BM, BN], queries down the rows: every kernel's score tiles, and dK/dV's when not KEYS_DOWN
_QK = _Axes("offs_m[:, None]", "offs_n[None, :]", "[:, None]")
# [BN, BM], keys down the rows: dK/dV with KEYS_DOWN computes K·Qᵀ, so P and dS come out of
# their products in the layout dV += P·dO and dK += dS·Q take them in, and never pass through
# shared memory to be transposed (the plan chooses: KernelTiles.keys_down)
_KQ = _Axes("offs_m[None, :]", "offs_n[:, None]", "[None, :]")


def _load_operand(i: int, operand: int, d: "scoreops.ScoreOpDef", h: str = "h", ax: _Axes = _QK) -> list[str]:
    """Load operand tile x{i} at (offs_m, offs_n), broadcast by its strides (0 on broadcast dims).
    `h`: the query head (a scalar, or a [BM, 1] column in a forward tile packing a GQA group).

    Outside the tensor (ragged tiles) it reads the op's pad value, so that even the positions
    the kernel later discards stay finite through the op and its derivative.
    """
    kind = d.operand
    other = repr(float(d.pad)) if kind == "float" else "0"
    return [
        f"x{i} = tl.load(X{operand} + b * sx{operand}_b + {h} * sx{operand}_h"
        f" + {ax.m} * sx{operand}_m + {ax.n} * sx{operand}_n,"
        f" mask=in_tile, other={other})",
        f"x{i} = x{i}.to(tl.float32)" if kind == "float" else f"x{i} = x{i} != 0",
    ]


def _program_lines(ops: list[tuple], var: str, h: str = "h", ax: _Axes = _QK) -> list[str]:
    """Lines that apply the program's ops to the fp32 scores in `var`."""
    lines = []
    for i, (name, operand, const) in enumerate(ops):
        d = scoreops.get(name)
        if operand is not None:
            lines += _load_operand(i, operand, d, h, ax)
        lines.append(f"{var} = " + _subst(d.triton, s=var, x=f"x{i}", c=const))
    return lines


def _mask_lines(prog: ScoreProgram, var: str, masked: bool, ax: _Axes = _QK) -> list[str]:
    if not masked:
        return []
    lines = ["visible = in_tile"]
    if prog.causal:
        lines.append(f"visible = visible & ({ax.n} <= {ax.m} + DIAG)")
    lines.append(f"{var} = tl.where(visible, {var}, float('-inf'))")
    return lines


def _grad_lines(ops: list[tuple], folded: bool, grad_operands: tuple = (), ax: _Axes = _QK) -> list[str]:
    """Lines that turn g = dL/d(program output, natural units) into dL/d(raw scores) `g`.

    The value each op saw is recomputed forward (s0 = raw scores, s1, ...), then the ops'
    derivatives chain in reverse. Values a derivative does not use are dead code to Triton.
    For operands in `grad_operands`, dL/dx per score is summed (an operand may feed several
    ops) and stored into that operand's [B, H, Nq, Nk] gradient buffer DX<i>.
    """
    lines, chain = ["s0 = qk"], []
    for i, (name, operand, const) in enumerate(ops):
        d = scoreops.get(name)
        c = const / LOG2E if (folded and i == 0) else const  # undo the log2(e) fold
        if operand is not None:
            lines += _load_operand(i, operand, d, ax=ax)
        lines.append(f"s{i + 1} = " + _subst(d.triton, s=f"s{i}", x=f"x{i}", c=c))
        chain.append((d, i, c))
    seen = set()
    for d, i, c in reversed(chain):
        o = ops[i][1]
        if o is not None and o in grad_operands:
            if d.triton_operand_grad is None:
                raise ValueError(f"flashfx: score op {ops[i][0]!r} has no gradient for its operand")
            term = _subst(d.triton_operand_grad, g="g", s=f"s{i}", x=f"x{i}", c=c)
            lines.append(f"dx{o} = dx{o} + {term}" if o in seen else f"dx{o} = {term}")
            seen.add(o)
        lines.append("g = " + _subst(d.triton_grad, g="g", s=f"s{i}", x=f"x{i}", c=c))
    for o in sorted(seen):
        lines.append(f"tl.store(DX{o} + b * sdx{o}_b + h * sdx{o}_h + {ax.m} * sdx{o}_m"
                     f" + {ax.n} * sdx{o}_n, dx{o}, mask=in_tile)")
    return lines


def _log2_units(diff: str, folded: bool) -> str:
    """A difference of kernel scores, in log2 units for exp2.

    Folded programs already score in log2 units. Otherwise scores are in natural units and
    the difference is taken before scaling by log2(e): finite fills such as finfo.min would
    overflow to -inf if scaled first, and eager softmax keeps them finite.
    """
    return diff if folded else f"({diff}) * LOG2E"


def _stats_lines(bh: str, folded: bool, lazy: float | None = None, full: bool = False,
                 finite: bool = False) -> list[str]:
    """Load the forward's row statistics, in the kernel's score units (ScoreProgram.stats_planes:
    one plane, the log-sum-exp, exactly when the scale is applied late). `full`: every row of
    the block is a query (no bounds mask). `finite`: every row of the block saw a key, so no
    statistic is -inf (no fix-up): a full block that sees all of its keys, under a program
    that masks nothing by value."""
    mask = "" if full else ", mask=m_ok, other=float('inf')"
    if lazy:
        if finite:
            return [f"lse = tl.load(Stats + {bh} * N_Q + offs_m{mask}) * LOG2E  # log2 units; every row saw a key"]
        return [
            f"lse = tl.load(Stats + {bh} * N_Q + offs_m{mask})",
            "# rows that saw no key (lse = -inf) and padded rows: +inf makes their p exactly 0",
            "lse = tl.where(lse == float('-inf'), float('inf'), lse) * LOG2E  # log2 units",
        ]
    scale = " * LOG2E" if folded else ""
    fix = ([f"rowmax = rowmax{scale}  # every row saw a key"] if finite else [
        "# rows that saw no key (rowmax = -inf) and padded rows: +inf makes their p exactly 0",
        f"rowmax = tl.where(rowmax == float('-inf'), float('inf'), rowmax){scale}"])
    return [
        f"rowmax = tl.load(Stats + {bh} * N_Q + offs_m{mask})",
        *fix,
        f"logsum = tl.load(Stats + STATS_PLANE + {bh} * N_Q + offs_m{'' if full else ', mask=m_ok, other=0.0'}) * LOG2E",
    ]


def _subst(expr: str, c=None, **names: str) -> str:
    """Put kernel variables for a registry expression's one-letter names s, x, g, c."""
    if c is not None:
        c = float(c)
        names["c"] = repr(c) if math.isfinite(c) else f"float('{c}')"
    return re.sub(r"\b([sxgc])\b", lambda m: names.get(m.group(1), m.group(1)), expr)


def _block(lines: list[str], indent: int) -> str:
    return textwrap.indent("\n".join(lines), " " * indent)


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------

_HEADER = '''\
# Generated by flashfx.codegen.attention for the score program:
#     {program}
# Do not edit: regenerated from the program on every cache miss.
import triton
import triton.language as tl

LOG2E = tl.constexpr({log2e!r})
LN2 = tl.constexpr(0.6931471805599453)
'''


def _fwd_step(prog, ops, folded, masked: bool) -> str:
    head = "# ---- key block {} (bounds{} masks) ----".format(
        "n..n+BN, diagonal or ragged" if masked else "n..n+BN, fully visible",
        " and causal" if (masked and prog.causal) else "" if masked else ": no",
    )
    lines = [head, "offs_n = n + offs_n0"]
    if masked:
        lines += ["n_ok = offs_n < N_K", "in_tile = m_ok[:, None] & n_ok[None, :]"]
        kv_mask = "n_ok[:, None] & d_ok[None, :]"
    else:
        lines += ["in_tile = m_ok[:, None] & (offs_n0 >= 0)[None, :]"]
        kv_mask = "d_ok[None, :]"
    lines += _tma_or_ptr([
        "k = KDesc.load([b, hk, n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)",
        "v = VDesc.load([b, hk, n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)",
    ], [
        f"k = tl.load(k_ptrs + n * stride_kn, mask={kv_mask}, other=0.0)",
        f"v = tl.load(v_ptrs + n * stride_vn, mask={kv_mask}, other=0.0)",
    ])
    lines.append("s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BN] fp32")
    lazy = _lazy_scale(ops, folded)
    lines += _program_lines(ops[1:] if lazy else ops, "s", h="h_x")
    lines += _mask_lines(prog, "s", masked)
    lines.append("# online softmax: rescale what came before by exp(m_old - m_new)")
    if lazy:
        lines.append(f"m_new = tl.maximum(m_i, tl.max(s, 1) * {lazy!r})  # raw scores; scaled here")
    else:
        lines.append("m_new = tl.maximum(m_i, tl.max(s, 1))")
    if masked or any(name != "scale" for name, _, _ in ops):
        lines.append("m_use = tl.where(m_new == float('-inf'), 0.0, m_new)  # a row masked so far stays 0")
    else:  # no mask of any kind in this loop: every score, hence every row max, is finite
        lines.append("m_use = m_new")
    lines.append(f"alpha = tl.exp2({_log2_units('m_i - m_use', folded)})")
    if lazy:
        lines.append(f"p = tl.exp2(s * {lazy!r} - m_use[:, None])  # one fused multiply-add")
    else:
        lines.append(f"p = tl.exp2({_log2_units('s - m_use[:, None]', folded)})")
    lines.append("l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normalizer counts every probability")
    if prog.dropout:
        lines += _keep_lines("bh_x") + ["p = tl.where(keep, p, 0.0)  # dropped; 1/(1-p) at the end"]
    lines += [
        "acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)",
        "m_i = m_new",
    ]
    return _block(lines, 8)


def _tma_or_ptr(tma: list[str], ptr: list[str]) -> list[str]:
    """Tile loads through tensor descriptors (TMA: the copy engine fetches the tile, zero-filling
    rows and columns outside the tensor) when the launch passes them, else through pointers."""
    return ["if TMA:", *("    " + x for x in tma), "else:", *("    " + x for x in ptr)]


def _group_run(start: str, count: str, body: str) -> str:
    """A dK/dV loop over `count` query blocks from `start` for each query head of the group.

    FLAT: one loop over (head, block) pairs, one pipeline prologue per run instead of one per
    head; its divisor is kept at least 1, as a pipeliner may evaluate it for a loop that runs
    zero times. Otherwise a loop over blocks inside a loop over heads (a single loop when
    GROUP is 1), which leaves the pipeliner a plain counted loop.
    """
    return "\n".join([
        "    if FLAT:",
        f"        for i in range(0, GROUP * {count}):",
        f"            g_head = i // tl.maximum({count}, 1)",
        f"            m = {start} + (i - g_head * {count}) * BLOCK_M",
        "            h = hk * GROUP + g_head",
        "            bh = b * H + h",
        textwrap.indent(body, "    "),
        "    else:",
        "        for g_head in range(0, GROUP):",
        "            h = hk * GROUP + g_head",
        "            bh = b * H + h",
        f"            for m in range({start}, {start} + {count} * BLOCK_M, BLOCK_M):",
        textwrap.indent(body, "        "),
    ])


def _masks_nothing(prog) -> bool:
    """No score op can hide a key from a query (only constant scales): a row that sees its keys
    structurally has a finite row statistic."""
    return all(op.name == "scale" and op.operand is None for op in prog.ops)


def _keep_lines(bh: str, ax: _Axes = _QK) -> list[str]:
    """`keep`: which probabilities of this tile dropout keeps, from a counter-based RNG (Philox)
    at the score's global index, so the backward regenerates exactly the forward's mask."""
    return [
        f"rng = ({bh} * N_Q + {ax.m}).to(tl.int64) * N_K + {ax.n}",
        "keep = tl.rand(seed, rng) >= P_DROP",
    ]


def _bwd_step(prog, ops, folded, masked: bool, want: str, grad_operands: tuple = ()) -> str:
    """One (Q block, K block) tile of the backward, with its loads; want = "dkdv" or "dq"."""
    lazy = _lazy_scale(ops, folded)
    if want == "dkdv":  # K, V held; load this Q block's rows
        lines = [
            "# ---- query block m..m+BM ({}) ----".format("diagonal or ragged: masked" if masked else "no masks"),
            "offs_m = m + offs_m0",
            "m_ok = offs_m < N_Q",
            "q_ok = m_ok[:, None] & d_ok[None, :]" if masked else "q_ok = d_ok[None, :]",
        ] + _tma_or_ptr([
            "q = QDesc.load([b, h, m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)",
            "do = dODesc.load([b, h, m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)",
        ], [
            "q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)",
            "do = tl.load(dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd, mask=q_ok, other=0.0)",
        ]) + _stats_lines("bh", folded, lazy, full=not masked, finite=not masked and _masks_nothing(prog)) + [
            "delta = tl.load(Delta + bh * N_Q + offs_m{})".format(", mask=m_ok, other=0.0" if masked else ""),
        ]
    else:  # Q, dO held; load this K/V block's rows
        lines = [
            "# ---- key block n..n+BN ({}) ----".format("diagonal or ragged: masked" if masked else "no masks"),
            "offs_n = n + offs_n0",
            "n_ok = offs_n < N_K",
            "kv_ok = n_ok[:, None] & d_ok[None, :]" if masked else "kv_ok = d_ok[None, :]",
        ] + _tma_or_ptr([
            "k = KDesc.load([b, hk, n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)",
            "v = VDesc.load([b, hk, n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)",
        ], [
            "k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)",
            "v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)",
        ])
    if want == "dq":
        return _block(lines + _bwd_scores(prog, ops, folded, masked, want, grad_operands), 8)
    # dK/dV: the plan orients the tiles (KEYS_DOWN, a compile-time argument: one branch compiles)
    kd, qd = (_bwd_scores(prog, ops, folded, masked, want, keys_down=x) for x in (True, False))
    lines += ["if KEYS_DOWN:", *("    " + x for x in kd), "else:", *("    " + x for x in qd)]
    return _block(lines, 8)


def _bwd_scores(prog, ops, folded, masked: bool, want: str, grad_operands: tuple = (),
                keys_down: bool = False) -> list[str]:
    """A backward tile's products and score program, its blocks loaded. keys_down (dK/dV only):
    the tile is [BN, BM], computed as K·Qᵀ, so P and dS feed dV and dK from registers."""
    lazy = _lazy_scale(ops, folded)
    dkdv = want == "dkdv"
    kq = dkdv and keys_down
    lines = []
    ax = _KQ if kq else _QK
    r = ax.per_query
    if kq:
        lines += ["qk = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BN, BM] fp32: keys down the rows",
                  "in_tile = n_ok[:, None] & m_ok[None, :]"]
    else:
        lines += ["qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BN] fp32",
                  "in_tile = m_ok[:, None] & n_ok[None, :]"]
    lines.append("s = qk")
    lines += _program_lines(ops[1:] if lazy else ops, "s", ax=ax)
    lines += _mask_lines(prog, "s", masked, ax)
    if lazy:  # infinite masks only: no finfo.min rows, so rowmax + logsum loses nothing
        lines.append(f"p = tl.exp2(s * {lazy!r} - lse{r})  # recomputed probabilities")
    else:
        lines += [
            "# recomputed probabilities: exp(s - rowmax) / exp(logsum), never exp(s - lse), which",
            "# loses logsum when the row max is huge (a row of finfo.min fills: uniform weights)",
            f"p = tl.exp2({_log2_units(f's - rowmax{r}', folded)} - logsum{r})",
        ]
    lines.append("dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]" if kq else
                 "dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]")
    if prog.dropout:  # out = (p ∘ keep / (1 - P)) v: the mask and scale sit between p and v
        lines += _keep_lines("bh" if dkdv else "pid_bh", ax) + ["dp = tl.where(keep, dp * KEEP_SCALE, 0.0)"]
        if dkdv:
            lines.append("pv = tl.where(keep, p * KEEP_SCALE, 0.0)  # what multiplied v")
    lines.append(f"g = p * (dp - delta{r})  # dL/d(softmax input), natural units")
    if not lazy:  # (lazy: masked scores have g = 0 already; the scale multiplies dK, dQ once)
        # operand gradients come from the dQ kernel only: it visits each score exactly once
        lines += _grad_lines(ops, folded, () if dkdv else grad_operands, ax)
    if dkdv:
        t = (lambda x: x) if kq else (lambda x: f"tl.trans({x})")
        lines += [
            "dv = tl.dot({}, do, dv, input_precision=PRECISION)".format(t(("pv" if prog.dropout else "p") + ".to(do.dtype)")),
            "dk = tl.dot({}, q, dk, input_precision=PRECISION)".format(t("g.to(q.dtype)")),
        ]
    else:
        lines += ["dq = tl.dot(g.to(k.dtype), k, dq, input_precision=PRECISION)"]
    return lines


_FWD = '''

@triton.jit
def _attn_fwd(
    Q, K, V, Out, Stats, KDesc, VDesc, PartO, PartStats, {seedparam}{xptrs}   # q: [B, H, Nq, D]; k, v: [B, Hk, Nk, D]
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # stats: [2, B, H, Nq] contiguous fp32
    {xstrides}
    H, N_Q, N_K, STATS_PLANE,
    GROUP: tl.constexpr,          # query heads per K/V head (GQA); 1 for plain attention
    CAUSAL: tl.constexpr,         # 0: none, 1: top-left diagonal, 2: bottom-right diagonal
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,      # tl.dot input precision for fp32 inputs ("tf32" / "tf32x3")
    TMA: tl.constexpr,            # K, V tiles through the descriptors KDesc, VDesc (else K, V pointers)
    SPLITS: tl.constexpr,         # > 1: program_id(2) takes one part of the key range and writes
                                  # unnormalized partials to PartO, PartStats for _attn_fwd_combine
    PACK: tl.constexpr,           # a tile's rows are (query head of a GQA group, query) pairs, grid
                                  # axis 1 runs over B·Hk: each K/V block is read once per group
):
    tl.static_assert(HEAD_DIM_PAD >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL != 0:  # launch the longest query tiles of each head first (see the module doc)
        pid_m = tl.num_programs(0) - 1 - pid_m
    DIAG = 0
    if CAUSAL == 2:
        DIAG = N_K - N_Q  # query i sees keys j <= i + DIAG
{seedload}
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    # Per row: the query offs_m; its head h_x and batch·head bh_x (scalars, or [BM, 1] columns
    # when packed) and bh_v ([BM] when packed); the tile's queries lie in [m_first, m_end).
    if PACK:
        b = pid_bh // (H // GROUP)
        hk = pid_bh % (H // GROUP)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rows < GROUP * N_Q
        offs_m = rows % N_Q
        h_v = hk * GROUP + rows // N_Q
        bh_v = b * H + h_v
        h_x = h_v[:, None]
        bh_x = bh_v[:, None]
        r_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, GROUP * N_Q) - 1
        one_head = (pid_m * BLOCK_M) // N_Q == r_last // N_Q
        m_first = tl.where(one_head, (pid_m * BLOCK_M) % N_Q, 0)
        m_end = tl.where(one_head, r_last % N_Q + 1, N_Q)
    else:
        b = pid_bh // H
        h_x = pid_bh % H
        hk = h_x // GROUP
        bh_v = pid_bh
        bh_x = pid_bh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        m_first = pid_m * BLOCK_M
        m_end = pid_m * BLOCK_M + BLOCK_M

    # ---- load the Q tile once; it stays in registers for the whole loop ----
    q_ptrs = Q + b * stride_qb + h_x * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # ---- key range: causal rows stop at their diagonal; whole blocks before it need no mask ----
    hi = N_K
    full = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL != 0:
        hi = tl.minimum(N_K, m_end + DIAG)
        hi = tl.maximum(hi, 0)
        full = tl.minimum(full, tl.maximum(m_first + DIAG + 1, 0) // BLOCK_N * BLOCK_N)

    if SPLITS > 1:  # this program's part of the key blocks: [s_lo, s_lo + chunk)
        chunk = tl.cdiv(tl.cdiv(N_K, BLOCK_N), SPLITS) * BLOCK_N
        s_lo = tl.program_id(2) * chunk
        full_lo = tl.minimum(s_lo, full)
        full_hi = tl.minimum(full, s_lo + chunk)
        masked_lo = tl.maximum(full, s_lo)
        masked_hi = tl.minimum(hi, s_lo + chunk)
    else:
        full_lo = 0
        full_hi = full
        masked_lo = full
        masked_hi = hi

    for n in range(full_lo, full_hi, BLOCK_N):
{step_full}
    for n in range(masked_lo, masked_hi, BLOCK_N):
{step_masked}

    if SPLITS > 1:
        # unnormalized: the combine weighs each part by exp(its row max - the overall max)
        part = (tl.program_id(2) * STATS_PLANE + bh_v * N_Q + offs_m).to(tl.int64)
        tl.store(PartO + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=m_ok[:, None])
        tl.store(PartStats + part, m_i, mask=m_ok)
        tl.store(PartStats + SPLITS * STATS_PLANE + part, l_i, mask=m_ok)
    else:
{epilogue_in_branch}


@triton.jit
def _attn_fwd_combine(
    PartO, PartStats, Out, Stats,     # partials: [SPLITS, B·H, Nq, D_PAD] fp32, [2, SPLITS, B·H, Nq]
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, STATS_PLANE,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # merge the parts of a split key range: O = Σ w_s acc_s / Σ w_s l_s, w_s = exp(m_s - max m)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    row = pid_bh * N_Q + offs_m
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    for s in tl.static_range(SPLITS):
        m_i = tl.maximum(m_i, tl.load(PartStats + s * STATS_PLANE + row, mask=m_ok, other=float('-inf')))
    m_use = tl.where(m_i == float('-inf'), 0.0, m_i)  # a row no part saw a key of stays 0
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for s in tl.static_range(SPLITS):
        m_s = tl.load(PartStats + s * STATS_PLANE + row, mask=m_ok, other=float('-inf'))
        l_s = tl.load(PartStats + (SPLITS + s) * STATS_PLANE + row, mask=m_ok, other=0.0)
        w = tl.where(m_s == float('-inf'), 0.0, tl.exp2({combine_units}))
        l_i += w * l_s
        part = (s * STATS_PLANE + row).to(tl.int64)
        acc += w[:, None] * tl.load(PartO + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=m_ok[:, None], other=0.0)
{epilogue}


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dOut, Stats, Delta, dK, dV, QDesc, dODesc, {seedparam}{xptrs}
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,   # dO
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    {xstrides}
    H, N_Q, N_K, STATS_PLANE,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,            # Q, dO tiles through QDesc, dODesc
    FLAT: tl.constexpr,           # one loop over (group head, query block) pairs, else nested loops
    KEYS_DOWN: tl.constexpr,      # tiles [BN, BM] (K·Qᵀ), else [BM, BN] (Q·Kᵀ): see _bwd_scores
    HEADS_FIRST: tl.constexpr,    # the grid is (B·Hk, key blocks), else (key blocks, B·Hk)
):
    # One program owns keys n0..n0+BN of one K/V head and sums over every query head of its
    # group and every query block: dK and dV are written once, no atomics (deterministic).
    # Programs start in grid order, first axis fastest: heads first, every head's first key
    # block (under a causal mask, the one that sees the most queries) starts before any second.
    if HEADS_FIRST:
        pid_n = tl.program_id(1)
        pid_bhk = tl.program_id(0)
    else:
        pid_n = tl.program_id(0)
        pid_bhk = tl.program_id(1)
    Hk = H // GROUP
    b = pid_bhk // Hk
    hk = pid_bhk % Hk
    DIAG = 0
    if CAUSAL == 2:
        DIAG = N_K - N_Q
{seedload}
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    # Query blocks, in three runs: [lo, m_full) cross the causal diagonal (masked);
    # [m_full, m_even) see the whole key block (no masks); [m_even, N_Q) is the ragged end.
    # Each run visits every query head of the group (see FLAT).
    lo = 0
    m_full = 0
    if CAUSAL != 0:
        lo = tl.maximum(pid_n * BLOCK_N - DIAG, 0) // BLOCK_M * BLOCK_M
        m_full = (tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - DIAG, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_even = N_Q // BLOCK_M * BLOCK_M
    run_lo = tl.minimum(m_full, N_Q)
    n_diag = (tl.maximum(run_lo - lo, 0) + BLOCK_M - 1) // BLOCK_M
{dkdv_diag_run}
    n_body = tl.maximum(m_even - m_full, 0) // BLOCK_M
{dkdv_body_run}
    tail = tl.maximum(m_full, m_even)
    n_tail = (tl.maximum(N_Q - tail, 0) + BLOCK_M - 1) // BLOCK_M
{dkdv_tail_run}

{dk_scale}    dk_ptrs = dK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = dV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, dOut, Out, Stats, Delta, dQ, KDesc, VDesc, {seedparam}{xptrs}{dxparams}
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    {xstrides}
    H, N_Q, N_K, STATS_PLANE,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,            # K, V tiles through KDesc, VDesc
    HEADS_FIRST: tl.constexpr,    # the grid is (B·H, query blocks), else (query blocks, B·H)
):
    if HEADS_FIRST:  # as in dK/dV: every head's longest tile starts before any head's second
        pid_m = tl.program_id(1)
        pid_bh = tl.program_id(0)
        tiles = tl.num_programs(1)
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        tiles = tl.num_programs(0)
    if CAUSAL != 0:  # the longest query tiles first, as in the forward
        pid_m = tiles - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    DIAG = 0
    if CAUSAL == 2:
        DIAG = N_K - N_Q
{seedload}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd, mask=q_ok, other=0.0)
{dq_stats}
    # Δ_i = Σ_d dO_id · O_id, the softmax backward's row term: from the dO tile held here and
    # one O tile; stored for _attn_bwd_dkdv, which runs after this kernel
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=q_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * N_Q + offs_m, delta, mask=m_ok)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # key blocks: whole blocks before the diagonal need no mask; then the diagonal and ragged end
    hi = N_K
    full = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL != 0:
        hi = tl.maximum(tl.minimum(N_K, pid_m * BLOCK_M + BLOCK_M + DIAG), 0)
        full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + DIAG + 1, 0) // BLOCK_N * BLOCK_N)
    for n in range(0, full, BLOCK_N):
{dq_full}
    for n in range(full, hi, BLOCK_N):
{dq_masked}

{dq_scale}    dq_ptrs = dQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=q_ok)
'''


def _epilogue(program: ScoreProgram, folded: bool, h: str = "h", bh: str = "pid_bh") -> list[str]:
    """The forward's last lines (unsplit, or the combine of a split one): O = acc / l, and the
    row statistics (program.stats_planes), from the running max m_i and sum l_i. `h`, `bh`: the
    rows' head (a scalar or a [BM, 1] column) and batch·head (a scalar or a [BM] vector)."""
    keep = " * KEEP_SCALE  # dropout kept 1 - P of the weights" if program.dropout else ""
    lines = [
        "# ---- normalize; rows that saw no key at all give 0, rowmax = -inf, logsum = 0 ----",
        "l_use = tl.where(l_i == 0.0, 1.0, l_i)",
        f"acc = acc / l_use[:, None]{keep}",
        f"o_ptrs = Out + b * stride_ob + {h} * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od",
        "tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])",
    ]
    if program.stats_planes == 1:  # folded: m_i is in log2 units
        return lines + [
            "# stats, natural-log units: the log-sum-exp (-inf for a row that saw no key)",
            f"tl.store(Stats + {bh} * N_Q + offs_m, (m_i + tl.log2(l_use)) * LN2, mask=m_ok)",
        ]
    return lines + [
        "# stats, natural-log units: [0] the row max of the scores, [1] log Σ exp(s - max)",
        f"tl.store(Stats + {bh} * N_Q + offs_m, {'m_i * LN2' if folded else 'm_i'}, mask=m_ok)",
        f"tl.store(Stats + STATS_PLANE + {bh} * N_Q + offs_m, tl.log2(l_use) * LN2, mask=m_ok)",
    ]


def emit(program: ScoreProgram, grad_operands: tuple = ()) -> str:
    """Triton source of the four kernels for `program` (see the module docstring).

    grad_operands: indices of float operands whose gradient the dQ kernel also writes.
    """
    ops, folded = _fold_log2e(program)
    xptrs, xstrides = _operand_params(program.num_operands)
    dxparams = "".join(f"DX{o}, sdx{o}_b, sdx{o}_h, sdx{o}_m, sdx{o}_n, " for o in grad_operands)
    header = _HEADER.format(program=program, log2e=LOG2E)
    dkdv_masked = _bwd_step(program, ops, folded, masked=True, want="dkdv")
    lazy = _lazy_scale(ops, folded)
    late_scale = "" if lazy is None else (
        "    {0} = {0} * %r  # the scale's derivative, once (see _lazy_scale)\n" % (lazy / LOG2E))
    if program.dropout:
        header += f"P_DROP = tl.constexpr({program.dropout!r})\nKEEP_SCALE = tl.constexpr({1.0 / (1.0 - program.dropout)!r})\n"
    return header + _FWD.format(
        xptrs=xptrs,
        xstrides=xstrides,
        step_full=_fwd_step(program, ops, folded, masked=False),
        step_masked=_fwd_step(program, ops, folded, masked=True),
        dkdv_diag_run=_group_run("lo", "n_diag", dkdv_masked),
        dkdv_body_run=_group_run("m_full", "n_body", _bwd_step(program, ops, folded, masked=False, want="dkdv")),
        dkdv_tail_run=_group_run("tail", "n_tail", dkdv_masked),
        dq_full=_bwd_step(program, ops, folded, masked=False, want="dq", grad_operands=grad_operands),
        dq_masked=_bwd_step(program, ops, folded, masked=True, want="dq", grad_operands=grad_operands),
        dxparams=dxparams,
        seedparam="Seed, " if program.dropout else "",
        seedload="    seed = tl.load(Seed)  # this call's dropout seed (int64)\n" if program.dropout else "",
        epilogue_in_branch=_block(_epilogue(program, folded, h="h_x", bh="bh_v"), 8),
        epilogue=_block(_epilogue(program, folded), 4),
        dq_stats=_block(_stats_lines("pid_bh", folded, lazy), 4),
        combine_units=_log2_units("m_s - m_use", folded),
        dk_scale=late_scale.format("dk"),
        dq_scale=late_scale.format("dq"),
    )


# ---------------------------------------------------------------------------------------------
# Kernel cache: one module per distinct source, written to disk (Triton reads the source file)
# ---------------------------------------------------------------------------------------------


def cache_dir() -> str:
    root = os.environ.get("FLASHFX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "flashfx"
    )
    path = os.path.join(root, "kernels")
    os.makedirs(path, exist_ok=True)
    return path


def load(program_text: str, grad_operands: tuple = ()):
    """The compiled-on-demand kernel module for an encoded program (cached by source hash)."""
    # Triton decides at decoration time whether a kernel is interpreted: key on it too.
    return _load(program_text, os.environ.get("TRITON_INTERPRET", "0") == "1", tuple(grad_operands))


@lru_cache(maxsize=None)
def _load(program_text: str, interpret: bool, grad_operands: tuple = ()):
    source = emit(ScoreProgram.decode(program_text), grad_operands)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"flashfx_attn_{digest}" + ("_interp" if interpret else "")
    path = os.path.join(cache_dir(), name + ".py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
