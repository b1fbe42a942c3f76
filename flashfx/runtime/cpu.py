"""Memory-efficient chunked attention for CPU tensors (Rabe & Staats, 2021), in plain torch.

Scores never exist at full size: only one [query chunk × key chunk] block at a time.

Forward, per query chunk (outer loop), over its key chunks (inner loop): the block of raw scores
q·kᵀ goes through the score program (`scoreops.apply_torch`, the registry's semantics) and the
causal mask, then an online softmax keeps, per query row, the running max m, the running sum
l of exp(s - m) and the accumulator acc = Σ exp(s - m)·v, rescaled whenever m grows. The
output is acc / l and the saved statistics are m and log l (their sum is the log-sum-exp).

Backward, chunk by chunk again: each block's probabilities are recomputed as exp(s - m - log l), so
nothing of size N² is ever stored; ds = p·(dout·vᵀ - delta) with delta = rowsum(dout·out), then
`scoreops.grad_torch` chains ds back through the program to d(q·kᵀ), which feeds dq, dk.

Extra memory is O(B·H·q_chunk·k_chunk) for a few live blocks plus O(B·H·N·D) for the outputs,
gradients and row statistics — never O(N²).

Layout. q: [B, H, Nq, D], k/v: [B, Hk, Nk, D], G = H / Hk query heads per K/V head (GQA). q
is viewed as [B, Hk, G, Nq, D] and a query chunk flattened to [B, Hk, G·cq, D], so one
matmul against the shared [B, Hk, ck, D] key chunk serves the whole group: K/V are never
repeated. The same block seen as [B, Hk, G, cq, ck] lines up with the operands, viewed as
[B, Hk, G, Nq, Nk], for the score program.

Fully masked rows (every score -inf) give out = 0, m = -inf and zero gradients, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flashfx import scoreops
from flashfx.ir import ScoreProgram

_ALL = slice(None)
_NEG_INF = float("-inf")

# --- chunk sizes -------------------------------------------------------------------------------

# One block of scores, across all batch elements and heads, holds at most this many elements
# (fp32: 2 MiB). The forward keeps ~3 blocks alive, the backward ~5 (scores, raw scores, dp,
# the program's recomputation and gradient), so with the O(N·D) outputs the extra memory stays
# in the tens of MiB at any N. Measured on 2 cores (B·H = 1, 8, 32; N = 2048..16384): 2**19 was
# as fast as or faster than 2**18, 2**20 and 2**22 — larger blocks fall out of cache — and freed
# blocks the allocator keeps resident grow with the block, so smaller is also leaner in RSS.
SCORE_BLOCK_BUDGET = 1 << 19
# Rabe & Staats' chunk sizes, used as caps: 1024 queries, 4096 keys.
MAX_Q_CHUNK, MAX_K_CHUNK = 1024, 4096
# Chunks are multiples of this (or the whole, shorter, sequence): below it a block is all Python
# overhead. For a huge B·H this floor wins over the budget.
MIN_CHUNK = 16


def default_chunk_sizes(batch_heads: int, nq: int, nk: int) -> tuple[int, int]:
    """(q_chunk, k_chunk) with batch_heads · q_chunk · k_chunk ≤ SCORE_BLOCK_BUDGET.

    The rule: each (batch, head) gets share = budget / (B·H) scores. The query chunk is the
    largest power of two ≤ √share, the key chunk what it leaves (share / q_chunk ≥ q_chunk),
    then the query chunk grows into what short key sequences leave unused. Each is rounded down
    to a multiple of MIN_CHUNK, capped at MAX_Q_CHUNK / MAX_K_CHUNK and at the sequence length.
    So: near-square blocks (causal attention skips the most) with the longer side on the keys
    (fewer online-softmax rescales); decoding (few queries) gets long key chunks; attention to a
    short context gets long query chunks. Only the MIN_CHUNK floor may exceed the budget.
    """
    share = max(SCORE_BLOCK_BUDGET // max(batch_heads, 1), 1)
    q_chunk = _fit(1 << (math.isqrt(share).bit_length() - 1), nq, MAX_Q_CHUNK)
    k_chunk = _fit(share // q_chunk, nk, MAX_K_CHUNK)
    q_chunk = max(q_chunk, _fit(share // k_chunk, nq, MAX_Q_CHUNK))
    return q_chunk, k_chunk


def _fit(n: int, length: int, cap: int) -> int:
    """n rounded down to a multiple of MIN_CHUNK (at least MIN_CHUNK), at most cap and length."""
    n = max(MIN_CHUNK, n // MIN_CHUNK * MIN_CHUNK)
    return max(1, min(n, cap, length))


def _chunk_sizes(q: Tensor, k: Tensor, q_chunk: int | None, k_chunk: int | None) -> tuple[int, int]:
    """The caller's chunk sizes where given, the default rule's otherwise."""
    B, H, Nq, _ = q.shape
    default_q, default_k = default_chunk_sizes(B * H, Nq, k.shape[2])
    q_chunk, k_chunk = q_chunk or default_q, k_chunk or default_k
    if q_chunk < 1 or k_chunk < 1:
        raise ValueError(f"flashfx: chunk sizes must be positive, got {q_chunk}, {k_chunk}")
    return q_chunk, k_chunk


# --- shared pieces of both passes ----------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests compare at 1e-10); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_operands(operands, B, H, Nq, Nk, Hk, G) -> list[Tensor]:
    """Each operand as a [B, Hk, G, Nq, Nk] view: expand (stride 0, no copy), split H."""
    return [x.expand(B, H, Nq, Nk).unflatten(1, (Hk, G)) for x in operands]


def _operand_blocks(xs: list[Tensor], rows: slice, cols: slice, ct: torch.dtype) -> list[Tensor]:
    """The operands' [B, Hk, G, cq, ck] blocks: float ones in the compute dtype (an fp64 bias
    must not promote fp32 scores), masks as they are. Only a block is ever copied."""
    blocks = []
    for x in xs:
        x = x[..., rows, cols]
        blocks.append(x.to(ct) if x.is_floating_point() else x)
    return blocks


def _diagonal(program: ScoreProgram, Nq: int, Nk: int) -> int | None:
    """Causal offset: query i sees keys j ≤ i + diag (None: not causal)."""
    if program.causal is None:
        return None
    return 0 if program.causal == "top_left" else Nk - Nq


def _key_end(diag: int | None, rows: slice, Nk: int) -> int:
    """Keys from here on are invisible to every row of the chunk: their chunks are skipped."""
    if diag is None:
        return Nk
    return max(0, min(Nk, rows.stop + diag))  # last row's last visible key + 1


def _causal_mask(diag: int | None, rows: slice, cols: slice) -> Tensor | None:
    """[cq, ck] bool, True = visible, for a block the diagonal crosses; None when the whole
    block is visible (or attention is not causal), so blocks below the diagonal build nothing."""
    if diag is None or cols.stop - 1 <= rows.start + diag:
        return None
    i = torch.arange(rows.start, rows.stop)[:, None]
    j = torch.arange(cols.start, cols.stop)[None, :]
    return j <= i + diag


def _block_scores(q_c: Tensor, k_c: Tensor, xs_c, program: ScoreProgram, mask: Tensor | None, G: int):
    """(s, raw): the program's scores of one block with the causal mask applied, and the raw
    q·kᵀ they came from, both [B, Hk, G·cq, ck]. `s` is always a fresh tensor, so callers may
    overwrite it in place while `raw` survives for the backward's `grad_torch`."""
    raw = q_c @ k_c.transpose(-2, -1)  # raw: [B, Hk, G·cq, ck]
    raw5 = raw.unflatten(2, (G, -1))  # [B, Hk, G, cq, ck], a view that lines up with xs_c
    s5 = scoreops.apply_torch(program, raw5, xs_c, _ALL, _ALL)
    if mask is not None:
        s5 = s5.masked_fill(~mask, _NEG_INF)
    elif s5 is raw5:  # an empty program: nothing made a copy yet
        s5 = raw5.clone()
    return s5.flatten(2, 3), raw


# --- forward -------------------------------------------------------------------------------------


@torch.no_grad()  # called directly (tests, benchmarks) with inputs that require grad: no graph
def attention_forward(q, k, v, operands, program: ScoreProgram, *, q_chunk=None, k_chunk=None, seed=None):
    """(out, stats): softmax(program(q·kᵀ)) @ v one block at a time, with an online softmax.

    out: [B, H, Nq, D] in q's dtype and with q's strides. stats: [program.stats_planes, B, H,
    Nq], float32 (float64 for float64 inputs, so that the backward keeps float64 accuracy):
    the row max of the scores and log Σ exp(s - max), or for a positive scale and infinite
    masks their sum, the log-sum-exp, alone. They are kept apart otherwise because a row of
    finfo.min fills has a max so large that the sum rounds log Σ away, and eager gives such a
    row uniform weights. Fully masked rows: max = -inf, log Σ = 0.
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = H // Hk
    ct = compute_dtype(q.dtype)
    q_chunk, k_chunk = _chunk_sizes(q, k, q_chunk, k_chunk)
    diag = _diagonal(program, Nq, Nk)

    qg = q.unflatten(1, (Hk, G))  # [B, Hk, G, Nq, D], a view
    xs = _group_operands(operands, B, H, Nq, Nk, Hk, G)  # [B, Hk, G, Nq, Nk] views
    out = torch.empty_like(q)  # q's strides: what the custom op's fake implementation promises
    out_g = out.unflatten(1, (Hk, G))  # [B, Hk, G, Nq, D]
    stats = torch.empty(2, B, Hk, G, Nq, dtype=ct)

    for r0 in range(0, Nq, q_chunk):
        rows = slice(r0, min(r0 + q_chunk, Nq))
        cq = rows.stop - rows.start
        q_c = qg[..., rows, :].to(ct).flatten(2, 3)  # [B, Hk, G·cq, D]
        m = torch.full((B, Hk, G * cq, 1), _NEG_INF, dtype=ct)  # running max
        l = torch.zeros(B, Hk, G * cq, 1, dtype=ct)  # running Σ exp(s - m)  # noqa: E741
        acc = torch.zeros(B, Hk, G * cq, D, dtype=ct)  # running Σ exp(s - m) · v

        for c0 in range(0, _key_end(diag, rows, Nk), k_chunk):
            cols = slice(c0, min(c0 + k_chunk, Nk))
            k_c, v_c = k[..., cols, :].to(ct), v[..., cols, :].to(ct)  # [B, Hk, ck, D]
            xs_c = _operand_blocks(xs, rows, cols, ct)
            # s: [B, Hk, G·cq, ck]; the raw scores are dropped at once, the forward needs no grad
            s = _block_scores(q_c, k_c, xs_c, program, _causal_mask(diag, rows, cols), G)[0]
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # rows that have seen only -inf so far: subtract 0, so exp gives 0 rather than NaN
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = s.sub_(m_safe).exp_()  # in place: the block's scores become its weights
            alpha = torch.exp(m - m_safe)  # rescales what was summed under the old max
            l = l.mul_(alpha).add_(p.sum(-1, keepdim=True))  # noqa: E741
            if program.dropout:  # the normalizer l counts every weight; v sees the kept ones
                p = p * dropout_keep(seed, program.dropout, (B, H, Hk, G, Nq, Nk), rows, cols)
            acc = acc.mul_(alpha).add_(p @ v_c)  # [B, Hk, G·cq, D]
            m = m_new
            del s, p

        seen = l > 0  # false only for fully masked rows: out = 0, max = -inf, log Σ = 0
        l_safe = torch.where(seen, l, torch.ones_like(l))
        keep_scale = 1.0 - program.dropout  # dropout's kept weights are scaled by 1 / (1 - p)
        out_g[..., rows, :] = (acc / (l_safe * keep_scale)).unflatten(2, (G, cq))
        stats[0, ..., rows] = m.squeeze(-1).unflatten(2, (G, cq))
        stats[1, ..., rows] = torch.log(l_safe).squeeze(-1).unflatten(2, (G, cq))
    stats = stats.reshape(2, B, H, Nq)
    if program.stats_planes == 1:  # the log-sum-exp: -inf for fully masked rows
        return out, stats.sum(0, keepdim=True)
    return out, stats


# --- backward ------------------------------------------------------------------------------------


@torch.no_grad()
def attention_backward(dout, q, k, v, out, stats, operands, program: ScoreProgram, *, q_chunk=None, k_chunk=None,
                       operand_grads: dict[int, tuple] | None = None, seed=None):
    """(dq, dk, dv), each with its input's dtype and strides; probabilities recomputed per
    block from q, k and the saved row statistics, so memory stays O(N·chunk) like the forward.

    operand_grads: {operand index: its 4-D shape (1 where it broadcasts)} for float operands
    that require grad. Then returns (dq, dk, dv, {index: dL/d operand}) in the compute dtype;
    each block's contribution is summed over the broadcast dims at once, so memory stays
    O(operand) however large B·H·Nq·Nk is.
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = H // Hk
    ct = compute_dtype(q.dtype)
    q_chunk, k_chunk = _chunk_sizes(q, k, q_chunk, k_chunk)
    diag = _diagonal(program, Nq, Nk)

    qg, dout_g, out_g = (t.unflatten(1, (Hk, G)) for t in (q, dout, out))  # [B, Hk, G, Nq, D]
    # fully masked rows: max = -inf becomes +inf, so exp(s - max) = 0 instead of NaN
    # one plane: the log-sum-exp serves as the max, with log Σ = 0
    rowmax = stats[0].to(ct)
    rowmax_g = rowmax.masked_fill(rowmax == _NEG_INF, float("inf")).unflatten(1, (Hk, G))  # [B, Hk, G, Nq]
    logsum_g = (stats[1].to(ct) if program.stats_planes == 2 else torch.zeros_like(rowmax)).unflatten(1, (Hk, G))
    xs = _group_operands(operands, B, H, Nq, Nk, Hk, G)
    dq = torch.empty_like(q)  # each query chunk's rows are written once
    dq_g = dq.unflatten(1, (Hk, G))
    # dk, dv collect from every query chunk: accumulate in the compute dtype, in k's and v's
    # strides (for fp32/fp64 inputs these are the results themselves, no final copy)
    dk = torch.zeros_like(k, dtype=ct)  # [B, Hk, Nk, D]
    d_ops = {i: torch.zeros(shape, dtype=ct) for i, shape in (operand_grads or {}).items()}
    dv = torch.zeros_like(v, dtype=ct)

    for r0 in range(0, Nq, q_chunk):
        rows = slice(r0, min(r0 + q_chunk, Nq))
        cq = rows.stop - rows.start
        q_c = qg[..., rows, :].to(ct).flatten(2, 3)  # [B, Hk, G·cq, D]
        do_c = dout_g[..., rows, :].to(ct).flatten(2, 3)  # [B, Hk, G·cq, D]
        # delta = rowsum(dout · out): the softmax backward's per-row term, [B, Hk, G·cq, 1]
        delta = (do_c * out_g[..., rows, :].to(ct).flatten(2, 3)).sum(-1, keepdim=True)
        max_c = rowmax_g[..., rows].flatten(2, 3).unsqueeze(-1)  # [B, Hk, G·cq, 1]
        logsum_c = logsum_g[..., rows].flatten(2, 3).unsqueeze(-1)
        dq_c = torch.zeros(B, Hk, G * cq, D, dtype=ct)

        for c0 in range(0, _key_end(diag, rows, Nk), k_chunk):
            cols = slice(c0, min(c0 + k_chunk, Nk))
            k_c, v_c = k[..., cols, :].to(ct), v[..., cols, :].to(ct)  # [B, Hk, ck, D]
            xs_c = _operand_blocks(xs, rows, cols, ct)
            s, raw = _block_scores(q_c, k_c, xs_c, program, _causal_mask(diag, rows, cols), G)
            # p = exp(s - max - log Σ): the max first, so finfo.min rows keep their log Σ
            p = s.sub_(max_c).sub_(logsum_c).exp_()  # [B, Hk, G·cq, ck], in place
            # dv += pᵀ · dout; the matmul over G·cq rows also sums the group's heads.
            # d(program output) = p · (dout · vᵀ - delta), the softmax backward
            if program.dropout:  # out = (p ∘ keep / (1 - P)) v, with the forward's mask
                kept = dropout_keep(seed, program.dropout, (B, H, Hk, G, Nq, Nk), rows, cols).to(ct) / (1.0 - program.dropout)
                dv[..., cols, :] += (p * kept).transpose(-2, -1) @ do_c
                ds = (do_c @ v_c.transpose(-2, -1)).mul_(kept).sub_(delta).mul_(p)
            else:
                dv[..., cols, :] += p.transpose(-2, -1) @ do_c  # [B, Hk, ck, D]
                ds = (do_c @ v_c.transpose(-2, -1)).sub_(delta).mul_(p)  # [B, Hk, G·cq, ck]
            del p, s
            # chained back through the program's ops, on the [B, Hk, G, cq, ck] views
            ds5 = scoreops.grad_torch(program, ds.unflatten(2, (G, cq)), raw.unflatten(2, (G, cq)), xs_c, _ALL, _ALL,
                                      want_operands=tuple(d_ops))
            if d_ops:
                ds5, dxs = ds5
                for i, dx in dxs.items():
                    _accumulate_operand_grad(d_ops[i], dx, rows, cols)
            ds = ds5.flatten(2, 3)  # d(q·kᵀ): [B, Hk, G·cq, ck]
            dq_c += ds @ k_c
            dk[..., cols, :] += ds.transpose(-2, -1) @ q_c  # [B, Hk, ck, D]
            del ds, ds5, raw

        dq_g[..., rows, :] = dq_c.unflatten(2, (G, cq))
    # each gradient has its input's dtype and strides, as the op's fake implementation promises
    if operand_grads is not None:
        return dq, dk.to(k.dtype), dv.to(v.dtype), d_ops
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _accumulate_operand_grad(acc: Tensor, dx: Tensor, rows: slice, cols: slice) -> None:
    """acc[..., rows, cols] += dx summed to acc's shape; dx: [B, Hk, G, cq, ck] per score."""
    dx = dx.expand(*dx.shape[:3], rows.stop - rows.start, cols.stop - cols.start).flatten(1, 2)  # [B, H, cq, ck]
    dims = [d for d in range(4) if acc.shape[d] == 1 and dx.shape[d] != 1]
    if dims:
        dx = dx.sum(dims, keepdim=True)
    acc[..., rows if acc.shape[2] != 1 else _ALL, cols if acc.shape[3] != 1 else _ALL] += dx


# --- dropout -------------------------------------------------------------------------------------

_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64


def _shr(z: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def uniform_at(seed: int, index: Tensor) -> Tensor:
    """A uniform [0, 1) float64 per int64 `index`, a pure function of (seed, index): the
    splitmix64 finalizer, so any chunking of the scores draws the same number at a position."""
    offset = ((seed + 1) * _GOLDEN + (1 << 63)) % (1 << 64) - (1 << 63)  # as a wrapped int64
    z = index + offset  # int64 arithmetic wraps, as the hash wants
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * 2.0**-53


def dropout_keep(seed: int, p: float, sizes: tuple, rows: slice, cols: slice) -> Tensor:
    """Which weights of a [B, Hk, G·cq, ck] block dropout keeps (as 0/1 float32), drawn at
    the scores' global index ((b·H + h)·Nq + i)·Nk + j with h = hk·G + g."""
    if seed is None:
        raise ValueError("flashfx: a program with dropout needs a seed")
    B, H, Hk, G, Nq, Nk = sizes
    b = torch.arange(B).view(B, 1, 1, 1, 1)
    h = torch.arange(H).view(1, Hk, G, 1, 1)
    i = torch.arange(rows.start, rows.stop).view(1, 1, 1, -1, 1)
    j = torch.arange(cols.start, cols.stop).view(1, 1, 1, 1, -1)
    index = ((b * H + h) * Nq + i) * Nk + j  # [B, Hk, G, cq, ck]
    return (uniform_at(seed, index) >= p).to(torch.float32).flatten(2, 3)
