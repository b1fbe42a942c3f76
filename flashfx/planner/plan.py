"""Tile plans: block sizes, warps and pipeline depth for the generated kernels.

A plan must fit the GPU's shared memory. The footprint of the forward kernel is the Q tile,
held for the whole loop, plus `stages` buffered copies of a K tile and a V tile:

    sram_fwd = elt · (BLOCK_M·D + stages · 2·BLOCK_N·D)            [bytes]

and of the backward kernels, which hold one side (K, V or Q, dO) and stream the other:

    sram_bwd = elt · (2·BLOCK_hold·D + stages · 2·BLOCK_stream·D)  [bytes]

`plan` starts from the block shapes that suit each head dim on recent GPUs and shrinks
stages, then the streamed block, until the footprint fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flashfx.planner.hardware import GPU


@dataclass(frozen=True)
class KernelTiles:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    sram_bytes: int  # predicted shared memory of one program


@dataclass(frozen=True)
class TilePlan:
    head_dim_pad: int  # head dim rounded up to a power of two (>= 16): tl.dot's tile width
    fwd: KernelTiles
    bwd_dkdv: KernelTiles  # one program holds a K/V block, streams Q blocks
    bwd_dq: KernelTiles  # one program holds a Q block, streams K/V blocks
    sram_limit: int  # bytes of shared memory one program may use on this GPU

    def summary(self) -> str:
        f, a, b = self.fwd, self.bwd_dkdv, self.bwd_dq
        return (
            f"fwd {f.block_m}x{f.block_n} w{f.num_warps} s{f.num_stages} "
            f"({f.sram_bytes // 1024} KiB), bwd dkdv {a.block_m}x{a.block_n} w{a.num_warps} "
            f"s{a.num_stages}, dq {b.block_m}x{b.block_n} w{b.num_warps} s{b.num_stages}; "
            f"SRAM limit {self.sram_limit // 1024} KiB"
        )


def _pow2_at_least(x: int, lo: int = 16) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def _fit(hold: int, stream: int, d_pad: int, elt: int, warps: int, stages: int, limit: int,
         hold_tiles: int, stream_tiles: int) -> tuple[int, int, int, int, int]:
    """Shrink pipeline stages, then the streamed block, until the tiles fit `limit` bytes.

    Returns (hold block, stream block, warps, stages, bytes).
    """
    while True:
        sram = elt * d_pad * (hold_tiles * hold + stages * stream_tiles * stream)
        if sram <= limit:
            return hold, stream, warps, stages, sram
        if stages > 1:
            stages -= 1
        elif stream > 16:
            stream //= 2
        elif hold > 16:
            hold //= 2
        else:
            raise ValueError(
                f"flashfx: no tile plan fits {limit} bytes of shared memory at head dim {d_pad}"
            )


@lru_cache(maxsize=None)
def plan(head_dim: int, elt_bytes: int, gpu: GPU, *, interpret: bool = False) -> TilePlan:
    """Choose tiles for one attention site's kernels on `gpu`.

    head_dim:  D of q/k/v (any size 1..256)
    elt_bytes: bytes per element of q/k/v (2 for fp16/bf16, 4 for fp32)
    interpret: the Triton interpreter (CPU): small tiles keep it fast; SRAM does not matter
    """
    if not 1 <= head_dim <= 256:
        raise ValueError(f"flashfx: head dim must be in 1..256, got {head_dim}")
    d_pad = _pow2_at_least(head_dim)
    limit = gpu.smem_per_block

    if interpret:
        t = KernelTiles(16, 16, 4, 1, elt_bytes * d_pad * 48)
        return TilePlan(d_pad, t, t, t, limit)

    # Starting shapes measured on an H100-class GPU (bf16, N=4096, a sweep of block shapes,
    # warps and stages): D<=64 fwd 64x64 w4; D=128 fwd 128x64 w8; bwd 64x64 (dK/dV) and
    # 64x32 (dQ) with 4 warps, 2 stages. fp32 and D>128 start at half the rows.
    big = elt_bytes >= 4 or d_pad > 128
    if big:
        fwd = KernelTiles(*_fit(64, 32, d_pad, elt_bytes, 4, 3, limit, 1, 2))
    elif d_pad <= 64:
        fwd = KernelTiles(*_fit(64, 64, d_pad, elt_bytes, 4, 3, limit, 1, 2))
    else:
        fwd = KernelTiles(*_fit(128, 64, d_pad, elt_bytes, 8, 3, limit, 1, 2))
    # backward: the held side keeps 2 tiles (K, V / Q, dO); the streamed side 2 a stage
    kv_rows, q_rows = (32, 32) if big else (64, 64)
    kv_rows, q_rows, w, st, sram = _fit(kv_rows, q_rows, d_pad, elt_bytes, 4, 2, limit, 2, 2)
    dkdv = KernelTiles(q_rows, kv_rows, w, st, sram)  # K/V held, Q streamed
    q_hold, kv_stream = (32, 16) if big else (64, 32)
    dq = KernelTiles(*_fit(q_hold, kv_stream, d_pad, elt_bytes, 4, 2, limit, 2, 2))  # Q held
    return TilePlan(d_pad, fwd, dkdv, dq, limit)
