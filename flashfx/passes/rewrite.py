"""Replace each fused site by one call of the flashfx custom op."""

from __future__ import annotations

import operator

import torch
from torch import fx

import flashfx.runtime.ops  # noqa: F401  (registers torch.ops.flashfx)
from flashfx.passes.match import AttentionSite, _val


def rewrite_site(gm: fx.GraphModule, site: AttentionSite) -> fx.Node:
    """Insert `torch.ops.flashfx.attention` for `site` and reroute the users of its output.

    The op wants q: [B, H, Nq, D], k/v: [B, Hk, Nk, D] and operands that broadcast to
    [B, H, Nq, Nk]: the site's views take each tensor there from the user's layout (3-D
    attention gets a unit head dim, [B·H, ...] is split into [B, H, ...], Kᵀ written by the
    user is transposed back), and the output view takes the result back.
    """
    g = gm.graph
    with g.inserting_before(site.output):
        q = site.q_view.emit(g, site.q)
        k = site.k_view.emit(g, site.k)
        v = site.v_view.emit(g, site.v)
        operands = [x.view.emit(g, _as_tensor(g, x.node, site)) for x in site.operands]
        seed = _seed(g, site) if site.program.dropout else None
        call = g.call_function(torch.ops.flashfx.attention.default, (q, k, v, operands, site.program.encode(), seed))
        out = site.out_view.emit(g, g.call_function(operator.getitem, (call, 0)))
    out.meta.update({k: v for k, v in site.output.meta.items() if k in ("stack_trace", "source_fn_stack")})
    site.output.replace_all_uses_with(out)
    return call


def _seed(g: fx.Graph, site: AttentionSite) -> fx.Node:
    """A fresh dropout seed per call, drawn in the graph from torch's generator (so
    torch.manual_seed makes runs repeatable, and the compiler sees the randomness)."""
    device = _val(site.q).device
    return g.call_function(torch.randint, (0, 2**62, (1,)), {"dtype": torch.int64, "device": device})


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
