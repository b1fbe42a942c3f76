"""`flashfx.explain(fn, *args)`: what flashfx finds in a model, what it fuses, and why not.

It traces `fn` with Dynamo exactly as `torch.compile` would, runs the pipeline up to (not
including) the rewrite on each graph, and runs the graph unchanged. The caller's tensors are
not modified beyond what one call of `fn` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from flashfx.codegen import hopper, hopper_bwd
from flashfx.ir import ScoreProgram
from flashfx.passes import pipeline
from flashfx.planner import cost
from flashfx.runtime import gpu, ops
from flashfx.runtime import tiles as tiling


@dataclass
class SiteReport:
    graph: int  # which Dynamo graph (graph breaks make several)
    kind: str  # "matmul" or "sdpa"
    location: str  # the user's file:line
    fused: bool
    reason: str | None  # why not fused
    program: str  # the score program, readable
    q_shape: tuple
    k_shape: tuple
    dtype: str
    plan: str | None  # the kernels' tiles, or the CPU path
    notes: list = field(default_factory=list)


@dataclass
class Report:
    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0

    @property
    def fused(self) -> int:
        return sum(s.fused for s in self.sites)

    def __str__(self) -> str:
        lines = [f"flashfx: {self.fused} of {len(self.sites)} attention sites fused "
                 f"({self.graphs} graph{'s' if self.graphs != 1 else ''})"]
        for i, s in enumerate(self.sites):
            mark = "fused" if s.fused else "NOT fused"
            lines.append(f"  [{i}] {mark:9}  {_short(s.location)}  ({s.kind})")
            if s.q_shape:
                lines.append(f"        q {list(s.q_shape)}  k {list(s.k_shape)}  {s.dtype}")
            if s.fused:
                lines.append(f"        scores: {s.program}")
                if s.plan:
                    lines.append(f"        plan:   {s.plan}")
            else:
                lines.append(f"        why:    {s.reason}")
            for note in s.notes:
                lines.append(f"        note:   {note}")
        return "\n".join(lines)

    __repr__ = __str__


def _short(path_line: str) -> str:
    path, _, line = path_line.rpartition(":")
    try:
        path = os.path.relpath(path)
    except ValueError:
        pass
    return f"{path}:{line}" if path else path_line


def _hint(x) -> int:
    """A dimension as an int: a symbolic one by the value it was traced with."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.has_hint() else 1024
    return int(x)


def _element_size(node) -> int:
    val = node.meta.get("example_value", node.meta.get("val")) if hasattr(node, "meta") else None
    return val.element_size() if isinstance(val, torch.Tensor) else 4


def _bucket_note(q_shape, k_shape) -> str:
    """Which of a call's sizes its plan rounded up (plans are made per shape bucket: sequence
    lengths and batch·heads rounded up to powers of two), so that the plan's N and B·H are not
    read as the call's."""
    (B, H, Nq, _), Nk = q_shape, k_shape[2]
    planned = tiling.call_shape(q_shape, k_shape, ScoreProgram())
    sizes = (("N", Nq, planned["n_q"]), ("Nk", Nk, planned["n_k"]), ("B·H", B * H, planned["batch_heads"]))
    rounded = [f"{name} {n} as {as_}" for name, n, as_ in sizes if as_ != n and (name != "Nk" or Nk != Nq)]
    return f"; planned for the shape bucket: {', '.join(rounded)}" if rounded else ""


def _plan_text(site) -> str | None:
    if not site.fused:
        return None
    dev = site.q.meta.get("example_value", site.q.meta.get("val")).device
    q = torch.empty((1,) * (len(site.q_shape) - 1) + (int(site.q_shape[-1]),), dtype=site.dtype, device=dev)
    if ops.uses_triton(q):
        where = "" if dev.type == "cuda" else " (Triton interpreter)"
        shapes = [tuple(_hint(x) for x in s) for s in (site.q_shape, site.k_shape)]
        program = site.program or ScoreProgram()
        op_bytes = sum(_element_size(x.node) for x in site.operands)
        plan = tiling.for_shape(*shapes, site.dtype, dev, program, op_bytes)
        text = f"Triton kernels{where}, " + plan.summary()
        if dev.type == "cuda" and not tiling.interpreting():
            text += _bucket_note(*shapes)
        (B, H, Nq, _), Nk = shapes[0], shapes[1][2]
        shape = gpu.call_shape(*shapes, torch.finfo(site.dtype).bits // 8, program)
        ws_time = _ws_time(shape, dev)
        programs = -(-Nq // plan.fwd.block_m) * B * H
        parts = gpu.forward_splits(programs, Nk, plan.fwd.block_n, dev)
        if parts > 1:
            text += (f"; fwd key range in {parts} parts ({programs} query-block programs would leave SMs "
                     f"idle), merged by a combine kernel")
        elif gpu.ws_forward(program, site.dtype, dev, int(site.q_shape[-1]), Nq, Nk, B * H) is None:
            text += (f"; fwd: warp-specialized Gluon kernel (persistent, one program an SM; tiles of "
                     f"{2 * hopper.BLOCK_M} query rows in two warpgroups, {hopper.BLOCK_N}-key blocks, "
                     f"{hopper.STAGES} stages{ws_time('fwd')}) where the copy engine can read the tensors, the fwd tiles above "
                     f"elsewhere")
        if gpu.ws_dq(program, site.dtype, dev, int(site.q_shape[-1]), Nq, Nk) is None:
            text += (f"; bwd dQ: warp-specialized Gluon kernel ({2 * hopper_bwd.DQ_BLOCK_M} query rows a program in "
                     f"two warpgroups, {hopper_bwd.DQ_BLOCK_N}-key blocks, {hopper_bwd.DQ_STAGES} stages{ws_time('dq')}) "
                     f"where the "
                     f"copy engine can read the tensors, the dq tiles above elsewhere")
        if gpu.ws_backward(program, site.dtype, dev, int(site.q_shape[-1]), Nq, Nk) is None:
            text += (f"; bwd dK/dV: warp-specialized Gluon kernel ({2 * hopper_bwd.BLOCK_K} keys a program in two "
                     f"warpgroups, {hopper_bwd.BLOCK_M}-query blocks, {hopper_bwd.STAGES} stages{ws_time('dkdv')}) "
                     f"where the copy "
                     f"engine can read the tensors, the dkdv tiles above elsewhere")
        return text + _order_note(shape, dev)
    return "CPU chunked path (Rabe-Staats: query and key chunks, running max and sum)"


def _order_note(shape: cost.Shape, dev) -> str:
    """Which backward kernels start their programs heads first at this call (gpu.heads_first)."""
    first = [name for name, kernel in (("dQ", "dq"), ("dK/dV", "dkdv")) if gpu.heads_first_for(kernel, shape, dev)]
    if not first:
        return ""
    why = ("gpu.HEADS_FIRST" if gpu.HEADS_FIRST is not None
           else "causal, and the tensors they stream fit in L2")
    return (f"; bwd {' and '.join(first)} programs start heads first (every head's longest before any "
            f"head's second: {why})")


def _ws_time(shape: cost.Shape, dev):
    """kernel -> ", N us": a warp-specialized kernel's time at this call on the GPU, as the cost
    model predicts it (cost.predict_ws); no time for a device that is not a GPU."""

    def text(kernel: str) -> str:
        if dev.type != "cuda":
            return ""
        return f", {cost.predict_ws(kernel, shape, tiling.gpu_of(dev)).time_s * 1e6:.0f} us"
    return text


def explain(fn, *args, **kwargs) -> Report:
    """Trace `fn(*args, **kwargs)` and report every attention site found, fused or not."""
    report = Report()

    def recorder(gm, example_inputs, **_):
        graph = report.graphs
        report.graphs += 1
        result = pipeline.run(gm, example_inputs, stop_after="structure")
        for site in result.sites:
            report.sites.append(SiteReport(
                graph=graph, kind=site.kind, location=site.location, fused=site.fused,
                reason=site.reason, program=str(site.program), q_shape=site.q_shape,
                k_shape=site.k_shape, dtype=str(site.dtype).replace("torch.", "") if site.dtype else "",
                plan=_plan_text(site), notes=list(site.notes),
            ))
        return gm.forward

    compiled = torch.compile(fn, backend=recorder)
    compiled(*args, **kwargs)
    return report
