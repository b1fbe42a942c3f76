"""Memory-efficient chunked attention for CPU tensors (Rabe & Staats, 2021).

Scores exist only one [query chunk × key chunk] block at a time. The forward keeps, per query
row, a running max, a running sum of exponentials and a rescaled accumulator (online
softmax), and saves the log-sum-exp. The backward recomputes each block's probabilities from
Q, K and that log-sum-exp. Extra memory is O(B·H·chunk²) for one block plus O(N·D) for the
outputs and gradients — never O(N²).

GQA runs without copying K/V: q is viewed as [B, Hk, G, Nq, D] and K/V broadcast over G.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashfx import scoreops
from flashfx.ir import ScoreProgram

# One block of scores holds at most this many elements (fp32: 4 MiB); a few blocks are alive
# at once. Rabe & Staats use query chunks of 1024 and key chunks of 4096; we cap both there
# and shrink the query chunk to the budget. Larger blocks ran no faster on 2 cores.
SCORE_BLOCK_BUDGET = 1 << 20
MAX_Q_CHUNK, MAX_K_CHUNK = 1024, 4096


def chunk_sizes(batch_heads: int, nq: int, nk: int) -> tuple[int, int]:
    """Query and key chunk lengths so that one score block stays within the budget."""
    per_head = max(SCORE_BLOCK_BUDGET // max(batch_heads, 1), 64 * 64)
    k_chunk = min(nk, MAX_K_CHUNK, max(64, per_head // min(nq, MAX_Q_CHUNK)))
    q_chunk = min(nq, MAX_Q_CHUNK, max(16, per_head // k_chunk))
    return q_chunk, k_chunk


def _sizes(q: Tensor, k: Tensor):
    """B, H, Nq, D, Hk, Nk and the group size G = H / Hk."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    return B, H, Nq, D, Hk, Nk, H // Hk


def _chunks(batch_heads, nq, nk, q_chunk, k_chunk) -> tuple[int, int]:
    default_q, default_k = chunk_sizes(batch_heads, nq, nk)
    return q_chunk or default_q, k_chunk or default_k


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _visible(program: ScoreProgram, rows: range, cols: range, nq: int, nk: int, device) -> Tensor | None:
    """Causal visibility of a [rows × cols] block, or None if every score is visible."""
    if program.causal is None:
        return None
    diag = 0 if program.causal == "top_left" else nk - nq
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(cols.start, cols.stop, device=device)[None, :]
    return j <= i + diag


def _key_range(program: ScoreProgram, rows: range, nq: int, nk: int) -> int:
    """Keys past this index are invisible to every row in `rows` (causal): skip them."""
    if program.causal is None:
        return nk
    diag = 0 if program.causal == "top_left" else nk - nq
    return max(0, min(nk, rows.stop - 1 + diag + 1))


def _block_scores(q_c, k_c, operands, program, rows, cols, nq, nk, G):
    """Program output for one block, [B, Hk, G, cq, ck], and the raw q·kᵀ it came from."""
    raw = q_c @ k_c.transpose(-2, -1)  # [B, Hk, G, cq, ck]
    B, Hk = raw.shape[:2]
    # operands are [B, H, Nq, Nk] views; H = Hk·G splits without copying the block
    xs = [x[..., rows.start:rows.stop, cols.start:cols.stop].reshape(B, Hk, G, len(rows), len(cols))
          for x in operands]
    s = scoreops.apply_torch(program, raw, xs, slice(None), slice(None))
    vis = _visible(program, rows, cols, nq, nk, raw.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    if s is raw:  # callers turn s into probabilities in place; raw must survive for the grad
        s = raw.clone()
    return s, raw, xs


def attention_forward(q, k, v, operands, program: ScoreProgram, *, q_chunk=None, k_chunk=None):
    """(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32), chunk by chunk."""
    B, H, Nq, D, Hk, Nk, G = _sizes(q, k)
    ct = _compute_dtype(q)
    q_chunk, k_chunk = _chunks(B * H, Nq, Nk, q_chunk, k_chunk)
    qg = q.unflatten(1, (Hk, G))  # [B, Hk, G, Nq, D], a view
    kk, vv = k.unsqueeze(2), v.unsqueeze(2)  # [B, Hk, 1, Nk, D]
    out_full = torch.empty_like(q)  # q's strides: what the op's fake implementation promises
    out = out_full.unflatten(1, (Hk, G))
    lse = torch.empty(B, Hk, G, Nq, dtype=torch.float32 if ct == torch.float32 else ct)

    for r0 in range(0, Nq, q_chunk):
        rows = range(r0, min(r0 + q_chunk, Nq))
        q_c = qg[..., rows.start:rows.stop, :].to(ct)
        m = torch.full((B, Hk, G, len(rows), 1), float("-inf"), dtype=ct)  # running max
        l = torch.zeros((B, Hk, G, len(rows), 1), dtype=ct)  # running sum of exp(s - m)  # noqa: E741
        acc = torch.zeros((B, Hk, G, len(rows), D), dtype=ct)
        for c0 in range(0, _key_range(program, rows, Nq, Nk), k_chunk):
            cols = range(c0, min(c0 + k_chunk, Nk))
            k_c, v_c = kk[..., c0:cols.stop, :].to(ct), vv[..., c0:cols.stop, :].to(ct)
            s, _, _ = _block_scores(q_c, k_c, operands, program, rows, cols, Nq, Nk, G)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows masked so far stay 0
            p = s.sub_(m_use).exp_()  # in place: the block's scores become its probabilities
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.sum(-1, keepdim=True)  # noqa: E741
            acc = acc * alpha + p @ v_c
            m = m_new
            del s, p
        l_use = torch.where(l == 0, torch.ones_like(l), l)
        out[..., rows.start:rows.stop, :] = (acc / l_use).to(q.dtype)
        lse[..., rows.start:rows.stop] = (m + torch.log(l_use)).squeeze(-1).to(lse.dtype)
    return out_full, lse.reshape(B, H, Nq)


def attention_backward(dout, q, k, v, out, lse, operands, program: ScoreProgram, *, q_chunk=None, k_chunk=None):
    """(dq, dk, dv): each block's probabilities recomputed from q, k and the saved lse."""
    B, H, Nq, D, Hk, Nk, G = _sizes(q, k)
    ct = _compute_dtype(q)
    q_chunk, k_chunk = _chunks(B * H, Nq, Nk, q_chunk, k_chunk)
    qg = q.unflatten(1, (Hk, G))  # [B, Hk, G, Nq, D]
    dog = dout.unflatten(1, (Hk, G))
    # delta_i = Σ_d dO_id · O_id: the softmax backward's per-row term, [B, Hk, G, Nq, 1]
    delta = (dout.to(ct) * out.to(ct)).sum(-1).unflatten(1, (Hk, G)).unsqueeze(-1)
    lse_g = lse.to(ct).unflatten(1, (Hk, G)).unsqueeze(-1)
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))  # fully masked rows: p = 0
    kk, vv = k.unsqueeze(2), v.unsqueeze(2)
    dq = torch.zeros(B, Hk, G, Nq, D, dtype=ct)
    dk = torch.zeros(B, Hk, Nk, D, dtype=ct)
    dv = torch.zeros(B, Hk, Nk, D, dtype=ct)

    for r0 in range(0, Nq, q_chunk):
        rows = range(r0, min(r0 + q_chunk, Nq))
        sl = slice(rows.start, rows.stop)
        q_c, do_c = qg[..., sl, :].to(ct), dog[..., sl, :].to(ct)
        for c0 in range(0, _key_range(program, rows, Nq, Nk), k_chunk):
            cols = range(c0, min(c0 + k_chunk, Nk))
            k_c, v_c = kk[..., c0:cols.stop, :].to(ct), vv[..., c0:cols.stop, :].to(ct)
            s, raw, xs = _block_scores(q_c, k_c, operands, program, rows, cols, Nq, Nk, G)
            p = s.sub_(lse_g[..., sl, :]).exp_()  # [B, Hk, G, cq, ck], in place
            dv[..., c0:cols.stop, :] += (p.transpose(-2, -1) @ do_c).sum(2)
            g = (do_c @ v_c.transpose(-2, -1)).sub_(delta[..., sl, :]).mul_(p)  # dL/d(softmax in)
            del p, s
            g = scoreops.grad_torch(program, g, raw, xs, slice(None), slice(None))  # dL/d(q·kᵀ)
            dq[..., sl, :] += g @ k_c
            dk[..., c0:cols.stop, :] += (g.transpose(-2, -1) @ q_c).sum(2)
            del g, raw
    # gradients take their input's strides, as the op's fake implementation promises
    grads = []
    for like, g in ((q, dq.reshape(B, H, Nq, D)), (k, dk), (v, dv)):
        grads.append(torch.empty_like(like).copy_(g))
    return tuple(grads)

