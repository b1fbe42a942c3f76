"""Launch the generated Triton kernels (CUDA, or the Triton interpreter on CPU tensors)."""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache

import torch

from flashfx.codegen import attention as codegen
from flashfx.ir import ScoreProgram
from flashfx.planner.plan import TilePlan
from flashfx.runtime import tiles as tiling
from flashfx.runtime.tiles import interpreting  # noqa: F401 - re-exported

_CAUSAL_CODE = {None: 0, "top_left": 1, "bottom_right": 2}


def tile_plan(q: torch.Tensor, k: torch.Tensor | None = None, program: ScoreProgram | None = None,
              operands=()) -> TilePlan:
    """The planner's plan for a call with these q and k (k defaults to q's shape)."""
    return tiling.for_call(q, q if k is None else k, program or ScoreProgram(), operands)


def _kernels(program: ScoreProgram, grad_operands: tuple = ()):
    return _kernels_for(program, tuple(grad_operands), os.environ.get("TRITON_INTERPRET", "0"))


@lru_cache(maxsize=256)  # on every call: encoding the program and hashing its text add up
def _kernels_for(program: ScoreProgram, grad_operands: tuple, interpret: str):
    # tuning does not change the kernels' source: one module for tuned and untuned programs
    if program.autotune:
        program = dataclasses.replace(program, autotune=False)
    return codegen.load(program.encode(), grad_operands)


def _precision(q: torch.Tensor) -> str:
    if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _operand_args(operands):
    ptrs, strides = [], []
    for x in operands:  # each already a 4-D view broadcast to [B, H, Nq, Nk]
        ptrs.append(x)
        strides += list(x.stride())
    return ptrs, strides


def _seed_args(program: ScoreProgram, seed) -> list:
    if not program.dropout:
        return []
    if seed is None:
        raise ValueError("flashfx: a program with dropout needs a seed tensor")
    return [seed]


def forward(q, k, v, operands, program: ScoreProgram, tiles: TilePlan | None = None, seed=None):
    """(out [B, H, Nq, D], stats [2, B, H, Nq] fp32: row max, log-sum) via the forward kernel."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if tiles is None:
        return tiling.run_planned(lambda t: forward(q, k, v, operands, program, t, seed),
                                  q, k, program, operands, ("fwd",))
    kernels = _kernels(program)
    p = tiles
    out = torch.empty_like(q)
    # fp64 for fp64 inputs, as the op's fake implementation promises (the kernel computes fp32)
    stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    stats = torch.empty((2, B, H, Nq), device=q.device, dtype=stats_dtype)
    xptrs, xstrides = _operand_args(operands)
    t = p.fwd
    grid = (triton_cdiv(Nq, t.block_m), B * H)
    kernels._attn_fwd[grid](
        q, k, v, out, stats, *_seed_args(program, seed), *xptrs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *xstrides,
        H, Nq, Nk, B * H * Nq,
        GROUP=H // Hk, CAUSAL=_CAUSAL_CODE[program.causal],
        HEAD_DIM=D, HEAD_DIM_PAD=p.head_dim_pad,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, PRECISION=_precision(q),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, stats


def backward(dout, q, k, v, out, stats, operands, program: ScoreProgram, tiles: TilePlan | None = None,
             operand_grads: dict[int, tuple] | None = None, seed=None):
    """(dq, dk, dv): recomputes P tile by tile from Q, K and the saved row statistics.

    operand_grads: {operand index: 4-D shape} for operands that require grad; then returns
    (dq, dk, dv, {index: gradient of that shape, fp32}). The dQ kernel, which visits every
    score once, writes dL/dx per score into an fp32 [B, H, Nq, Nk] buffer (zero where blocks
    are skipped), summed here over the operand's broadcast dimensions: deterministic, and as
    large as the scores only while a bias that requires grad is being differentiated.
    """
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    wanted = tuple(sorted(operand_grads or {}))
    if tiles is None:
        return tiling.run_planned(
            lambda t: backward(dout, q, k, v, out, stats, operands, program, t, operand_grads, seed),
            q, k, program, operands, ("dkdv", "dq"), "+grad" + ",".join(map(str, wanted)) if wanted else "")
    kernels = _kernels(program, wanted)
    d_bufs = [torch.zeros((B, H, Nq, Nk), device=q.device, dtype=torch.float32) for _ in wanted]
    dx_args = [a for buf in d_bufs for a in (buf, *buf.stride())]
    p = tiles
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # the strides the fake impl promises
    xptrs, xstrides = _operand_args(operands)
    common = dict(GROUP=H // Hk, CAUSAL=_CAUSAL_CODE[program.causal],
                  HEAD_DIM=D, HEAD_DIM_PAD=p.head_dim_pad, PRECISION=_precision(q))

    t = p.fwd
    kernels._attn_bwd_delta[(triton_cdiv(Nq, t.block_m), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Nq,
        HEAD_DIM=D, HEAD_DIM_PAD=p.head_dim_pad, BLOCK_M=t.block_m,
    )
    t = p.bwd_dkdv
    kernels._attn_bwd_dkdv[(triton_cdiv(Nk, t.block_n), B * Hk)](
        q, k, v, dout, stats, delta, dk, dv, *_seed_args(program, seed), *xptrs,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *xstrides, H, Nq, Nk, B * H * Nq, **common,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    t = p.bwd_dq
    kernels._attn_bwd_dq[(triton_cdiv(Nq, t.block_m), B * H)](
        q, k, v, dout, stats, delta, dq, *_seed_args(program, seed), *xptrs, *dx_args,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        *xstrides, H, Nq, Nk, B * H * Nq, **common,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if operand_grads is None:
        return dq, dk, dv
    d_ops = {}
    for i, buf in zip(wanted, d_bufs):
        shape = operand_grads[i]
        dims = [d for d in range(4) if shape[d] == 1 and buf.shape[d] != 1]
        d_ops[i] = buf.sum(dims, keepdim=True) if dims else buf
    return dq, dk, dv, d_ops


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
