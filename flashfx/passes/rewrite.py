"""Replace each fused site by one call of the flashfx custom op."""

from __future__ import annotations

import operator

import torch
from torch import fx

import flashfx.runtime.ops  # noqa: F401  (registers torch.ops.flashfx)
from flashfx.passes.match import AttentionSite, _val


def rewrite_site(gm: fx.GraphModule, site: AttentionSite) -> fx.Node:
    """Insert `torch.ops.flashfx.attention` for `site` and reroute the users of its output.

    The op wants q: [B, H, Nq, D], k/v: [B, Hk, Nk, D]; 3-D attention gets a unit head dim
    (and so do its rank-3 operands), Kᵀ written by the user gets transposed back.
    """
    g = gm.graph
    three_d = len(site.q_shape) == 3
    with g.inserting_before(site.output):
        q, k, v = site.q, site.k, site.v
        if site.k_transposed:
            k = g.call_function(torch.transpose, (k, -2, -1))
        operands = [_as_tensor(g, x, site) for x in site.operands]
        if three_d:
            q, k, v = (g.call_function(torch.unsqueeze, (x, 1)) for x in (q, k, v))
            operands = [g.call_function(torch.unsqueeze, (x, 1)) if _rank(x) == 3 else x for x in operands]
        call = g.call_function(torch.ops.flashfx.attention.default, (q, k, v, operands, site.program.encode()))
        out = g.call_function(operator.getitem, (call, 0))
        if three_d:
            out = g.call_function(torch.squeeze, (out, 1))
    out.meta.update({k: v for k, v in site.output.meta.items() if k in ("stack_trace", "source_fn_stack")})
    site.output.replace_all_uses_with(out)
    return call


def _rank(x: fx.Node) -> int:
    v = _val(x)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _as_tensor(g: fx.Graph, x: fx.Node, site: AttentionSite) -> fx.Node:
    """A symbolic scalar (a scale computed from sizes) becomes a 0-d fp32 tensor operand."""
    if isinstance(_val(x), torch.Tensor):
        return x
    device = _val(site.q).device
    return g.call_function(torch.scalar_tensor, (x,), {"dtype": torch.float32, "device": device})


def rewrite(gm: fx.GraphModule, sites: list[AttentionSite], limit: int | None = None) -> int:
    """Rewrite the fused sites (at most `limit`), then drop the nodes nobody uses any more."""
    done = 0
    for site in sites:
        if not site.fused:
            continue
        if limit is not None and done >= limit:
            site.reason = f"not rewritten: rewrite limit {limit} reached (flashfx.config.max_rewrites)"
            continue
        rewrite_site(gm, site)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done
