"""The float64 reference every numerics test compares against: plain eager attention."""

import torch

from flashfx import scoreops
from flashfx.ir import ScoreProgram


def reference_attention(q, k, v, operands, program: ScoreProgram) -> torch.Tensor:
    """softmax(program(q·kᵀ)) @ v in float64 with the full N×N scores.

    q: [B, H, Nq, D]; k, v: [B, Hk, Nk, D] (K/V heads repeated for GQA); operands broadcast to
    [B, H, Nq, Nk]. Rows that see no key give 0, as the fused kernels define them.
    """
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-2, -1)
    xs = [x.double() if x.is_floating_point() else x for x in operands]
    s = scoreops.apply_torch(program, s, xs, slice(None), slice(None))
    nq, nk = s.shape[-2:]
    if program.causal:
        diag = 0 if program.causal == "top_left" else nk - nq
        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        s = s.masked_fill(j > i + diag, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row is NaN in eager: 0 here
    return p @ v
