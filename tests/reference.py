"""The float64 reference every numerics test compares against: plain eager attention.

Deliberately naive and independent of the runtime: full N×N scores, K/V heads copied with
repeat_interleave, the causal mask built explicitly. The score ops themselves come from
`scoreops.apply_torch`, the one definition of their semantics.
"""

import torch

from flashfx import scoreops
from flashfx.ir import ScoreProgram


def reference_attention(q, k, v, operands, program: ScoreProgram) -> torch.Tensor:
    """softmax(causal(program(q·kᵀ))) @ v, in float64 on the CPU, differentiable w.r.t. q, k, v.

    q: [B, H, Nq, D]; k, v: [B, Hk, Nk, D], H a multiple of Hk (query head h uses K/V head
    h // (H / Hk)); operands broadcastable to [B, H, Nq, Nk]. Inputs may live on any device:
    they are moved to the CPU in float64 here. Returns out [B, H, Nq, D] in float64.

    A row that sees no key (every score -inf) gives 0 and passes back zero gradients, as the
    fused kernels define it; eager softmax would give NaN there.
    """
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, Nk, D]
    s = q @ k.transpose(-2, -1)  # [B, H, Nq, Nk], no implicit scale

    xs = []
    for x in operands:
        x = x.to("cpu", torch.float64) if x.is_floating_point() else x.to("cpu")
        xs.append(x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)))
    s = scoreops.apply_torch(program, s, xs, slice(None), slice(None))

    nq, nk = s.shape[-2:]
    if program.causal is not None:
        diag = {"top_left": 0, "bottom_right": nk - nq}[program.causal]
        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        s = s.masked_fill(j > i + diag, float("-inf"))

    dead = torch.isneginf(s).all(-1, keepdim=True)  # rows with no visible key
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v
