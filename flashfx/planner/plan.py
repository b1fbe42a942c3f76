"""Tile plans: block sizes, warps and pipeline depth for the generated kernels, chosen by
the cost model in `cost.py`.

For each kernel the planner enumerates block sizes (32, 64, 128 rows each side), warps (4, 8)
and stages (1-4), drops every candidate whose predicted SRAM exceeds the GPU's per-block
limit or whose registers would spill heavily, and keeps the one of least predicted time
(ties: less SRAM). A plan that does not fit SRAM is never returned: when every candidate
would spill, the spilling ones are ranked (the model charges for spills); when none fits
SRAM, 16-row tiles with one or two stages; the planner raises if even those do not fit.

    plan(head_dim, elem_size, gpu)                          the call shape is unknown: plans
                                                            for N=4096 and 2**25 / (N·d) B·H
    plan(head_dim, elem_size, gpu, n_q=..., n_k=..., causal=..., group=..., batch_heads=...)
    candidates(kernel, head_dim, elem_size, gpu, k=5, ...)  the model's top-k, for autotuning
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

from flashfx.planner import cost
from flashfx.planner.hardware import GPU

DEFAULT_N = 4096
DEFAULT_TOKENS_X_WIDTH = 2**25  # B·N·H·d of the benchmark shapes (16384 tokens x 2048 wide)


@dataclass(frozen=True)
class KernelTiles:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    sram_bytes: int  # predicted shared memory of one program
    regs: int = 0  # predicted registers per thread
    time_s: float = 0.0  # predicted time of this kernel for the planned shape
    hbm_bytes: float = 0.0  # predicted DRAM bytes (after L2 reuse) for the planned shape
    tile_bytes: float = 0.0  # predicted memory -> SRAM bytes
    lower_bound_bytes: float = 0.0  # Saha-Ye / compulsory I/O lower bound
    keys_down: bool = False  # dK/dV only: [BN, BM] score tiles (K·Qᵀ), else [BM, BN] (Q·Kᵀ)

    @property
    def bound_ratio(self) -> float:
        """Bytes moved into SRAM over the I/O lower bound (>= 1; FlashAttention's is O(1))."""
        return self.tile_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 0.0


@dataclass(frozen=True)
class TilePlan:
    head_dim_pad: int  # head dim rounded up to a power of two (>= 16): tl.dot's tile width
    fwd: KernelTiles
    bwd_dkdv: KernelTiles  # one program holds a K/V block, streams Q blocks
    bwd_dq: KernelTiles  # one program holds a Q block, streams K/V blocks
    sram_limit: int  # bytes of shared memory one program may use on this GPU
    gpu: str = ""
    shape: str = ""  # the call the times and bytes are predicted for

    @property
    def sram_used(self) -> int:
        return max(t.sram_bytes for t in (self.fwd, self.bwd_dkdv, self.bwd_dq))

    @property
    def predicted_time_s(self) -> dict[str, float]:
        return {"fwd": self.fwd.time_s, "bwd_dkdv": self.bwd_dkdv.time_s, "bwd_dq": self.bwd_dq.time_s}

    def summary(self) -> str:
        def one(name, t):
            text = (f"{name} {t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}"
                    + (" keys down" if t.keys_down else "")
                    + f" SRAM {t.sram_bytes // 1024}/{self.sram_limit // 1024} KiB")
            if t.time_s:
                text += (f", {t.time_s * 1e6:.0f} us, HBM {_mib(t.hbm_bytes)},"
                         f" tiles {t.bound_ratio:.1f}x lower bound")
            return text

        head = f"{self.gpu}, {self.shape}: " if self.gpu else ""
        return head + "; ".join(one(n, t) for n, t in
                                (("fwd", self.fwd), ("bwd dkdv", self.bwd_dkdv), ("dq", self.bwd_dq)))


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _pow2_at_least(x: int, lo: int = 16) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


_BLOCKS = (32, 64, 128)
_WARPS = (4, 8)
_STAGES = (1, 2, 3, 4)


def _dot_rows(kernel: str, bm: int, bn: int, keys_down: bool = False) -> tuple[int, ...]:
    """The M (row) sizes of the kernel's tl.dot calls: the forward and dQ kernels multiply
    [BM, *] tiles only; dK/dV multiplies [BM, *] (QK^T, dO V^T) and [BN, *] (P^T dO, dS^T Q),
    or, keys down, [BN, *] only (K Q^T, V dO^T, P dO, dS Q)."""
    if kernel == "dkdv":
        return (bn,) if keys_down else (bm, bn)
    return (bm,)


def _sound(kernel: str, bm: int, bn: int, warps: int, keys_down: bool = False) -> bool:
    """Tiles the kernels compute correctly with. Measured on an H200 (triton 3.6): with 8
    warps, a dot of fewer than 16 rows per warp (a 32-row Q tile in dK/dV) gave wrong dK, so
    8 warps need every dot 128 rows or more; 4 warps are exact from 16 rows up, except dK/dV
    with a 32-row Q tile under a wider key block (32x64, 32x128: relative errors 0.005-0.06
    in two sweeps where every other config stays under 0.003). The Triton interpreter computes
    those tiles exactly (fp32, errors near 4e-7 against fp64), so the fault is in the code Triton
    3.6 generates for sm90 there, not in the kernel's logic. Keys down, those tiles are
    right (32x64 with 4 warps, 32x128 and 64x128 with 8: errors 2.4e-3 as every other config,
    H200)."""
    if kernel == "dkdv" and bm < 64 and bn > bm and not keys_down:
        return False
    return min(_dot_rows(kernel, bm, bn, keys_down)) >= (128 if warps == 8 else 16)


def _legal(kernel: str, gpu: GPU, bm: int, bn: int, warps: int, keys_down: bool = False) -> bool:
    """Tile shapes the MMA instructions can use without idle warps: wgmma (sm90+) gives each
    warp group of 4 warps 64 rows; mma.sync gives each warp 16 rows."""
    rows = min(_dot_rows(kernel, bm, bn, keys_down))
    return rows >= (16 * warps if gpu.arch.wgmma else 4 * warps)


def _ranked(kernel: str, shape: cost.Shape, gpu: GPU, cal: cost.Calibration | None = None) -> list[cost.Prediction]:
    """Candidates best first, from the first non-empty tier: legal shapes that fit SRAM and
    registers; any shape that fits SRAM, ranked by predicted time (the model charges for
    spills and for dots too short for the MMA the arch prefers: at d=256 dK/dV no legal shape
    fits the registers, and a 64x32 tile that spills measured 1.04-1.53x faster than 32x32);
    16-row tiles with one or two stages."""
    # dK/dV's tiles in both orientations: keys down on wgmma, where it saves the staging, for
    # 16-bit inputs (what it was measured on)
    downs = (False, True) if kernel == "dkdv" and gpu.arch.wgmma and shape.elt == 2 else (False,)
    grid = [c for c in itertools.product(_BLOCKS, _BLOCKS, _WARPS, _STAGES, downs) if _sound(kernel, *c[:3], c[4])]
    preds = [(cost.predict(kernel, shape, gpu, bm, bn, w, s, cal, keys_down=kd), _legal(kernel, gpu, bm, bn, w, kd))
             for bm, bn, w, s, kd in grid]
    small = [(cost.predict(kernel, shape, gpu, bm, bn, 4, s, cal), False)
             for bm, bn, s in itertools.product((16, 32), (16, 32), (1, 2))]
    tiers = (
        [p for p, legal in preds if legal and p.fits],
        [p for p, legal in preds if p.sram_bytes <= gpu.smem_per_block],
        [p for p, legal in small if p.sram_bytes <= gpu.smem_per_block],
    )
    ranked = next((t for t in tiers if t), [])
    ranked.sort(key=lambda p: (p.time_s, p.sram_bytes, p.num_warps, p.keys_down))
    return _measured_first(kernel, shape, gpu, ranked)


# Where the model ranks wrong and a measurement says what wins: (kernel, family) -> tiles
# (BM, BN, warps, stages, keys down). The family is what was measured; nothing else matches.
#
# dK/dV, causal MHA at d=128, 16-bit inputs, wgmma: keys down 32x64, 4 warps, 3 stages. The
# sweep had it best by 15-16% (docs/planner.md, "dK/dV's two orientations"); against the
# queries-down 64x64 the model ranks first, the whole backward took 0.922-0.938 of the time
# at N = 1024, 4096 and 16384 (H200, one process, configs taking turns), and lost 2-6% in the
# neighbouring families (full MHA, causal GQA4), which keep the model's choice. The model has
# no term that separates the orientations there.
#
# dK/dV, MHA at d=64, 16-bit inputs, wgmma, causal or not: keys down 64x64, 4 warps, 3 stages.
# Once full query blocks read their row statistics unmasked (keys down holds a dozen of them a
# thread), the whole backward took 0.953-1.002 of the time of the model's queries-down 64x64
# at N = 1024, 4096 and 16384, both masks, and 0.972 at GPT-2's layer shape (B=2, H=12, N=4096,
# q/k/v views of one projection) (H200, one process, configs taking turns; docs/benchmarks.md,
# "dK/dV keys down at D=64, chosen by the planner"). docs/planner_sweep.json predates that
# change; docs/planner_sweep_d64mha.json was swept after it.
_MEASURED = {
    ("dkdv", "wgmma", 2, 128, True, "mha"): (32, 64, 4, 3, True),
    ("dkdv", "wgmma", 2, 64, True, "mha"): (64, 64, 4, 3, True),
    ("dkdv", "wgmma", 2, 64, False, "mha"): (64, 64, 4, 3, True),
}


def _family(kernel: str, shape: cost.Shape, gpu: GPU) -> tuple | None:
    if shape.operand_bytes or shape.products != 1:
        return None  # score operands and 3xTF32 change the kernel: not what was measured
    return (kernel, "wgmma" if gpu.arch.wgmma else "mma", shape.elt, shape.head_dim, shape.causal,
            "mha" if shape.group == 1 else "gqa")


def _measured_first(kernel: str, shape: cost.Shape, gpu: GPU, ranked: list) -> list:
    """`ranked` with the measured tiles of this call's family first, when they are among the
    candidates (they fit this GPU)."""
    want = _MEASURED.get(_family(kernel, shape, gpu))
    if want is None:
        return ranked
    hit = [p for p in ranked if (p.block_m, p.block_n, p.num_warps, p.num_stages, p.keys_down) == want]
    return hit + [p for p in ranked if p not in hit]


def _tiles(p: cost.Prediction) -> KernelTiles:
    return KernelTiles(p.block_m, p.block_n, p.num_warps, p.num_stages, p.sram_bytes, p.regs,
                       p.time_s if p.time_s != float("inf") else 0.0, p.hbm_bytes, p.tile_bytes,
                       p.lower_bound_bytes, p.keys_down)


def _shape(head_dim, elem_size, n_q, n_k, causal, group, batch_heads, operand_bytes=0, products=1) -> cost.Shape:
    d_pad = _pow2_at_least(head_dim)
    n_q = n_q or n_k or DEFAULT_N
    n_k = n_k or n_q
    if batch_heads is None:
        batch_heads = max(group, DEFAULT_TOKENS_X_WIDTH // (n_q * d_pad))
    return cost.Shape(n_q, n_k, d_pad, elem_size, bool(causal), group, batch_heads, operand_bytes, products)


def candidates(kernel: str, head_dim: int, elem_size: int, gpu: GPU, k: int = 5, *,
               n_q: int | None = None, n_k: int | None = None, causal: bool = False,
               group: int = 1, batch_heads: int | None = None, operand_bytes: int = 0,
               products: int = 1) -> list[KernelTiles]:
    """The model's k best tiles for `kernel` ("fwd", "dkdv" or "dq"), best first: all fit."""
    _check(head_dim)
    shape = _shape(head_dim, elem_size, n_q, n_k, causal, group, batch_heads, operand_bytes, products)
    return [_tiles(p) for p in _ranked(kernel, shape, gpu)[:k]]


def _check(head_dim: int) -> None:
    if not 1 <= head_dim <= 256:
        raise ValueError(f"flashfx: head dim must be in 1..256, got {head_dim}")


@lru_cache(maxsize=None)
def plan(head_dim: int, elt_bytes: int, gpu: GPU, interpret: bool = False, *,
         n_q: int | None = None, n_k: int | None = None, causal: bool = False, group: int = 1,
         batch_heads: int | None = None, operand_bytes: int = 0, products: int = 1) -> TilePlan:
    """Choose tiles for one attention site's kernels on `gpu`.

    head_dim:  D of q/k/v (any size 1..256)
    elt_bytes: bytes per element of q/k/v (2 for fp16/bf16, 4 for fp32)
    interpret: the Triton interpreter (CPU): small tiles keep it fast; SRAM does not matter
    n_q, n_k, causal, group (query heads per K/V head), batch_heads (B·H): the call, when
               known; the choice depends on it only through waves, L2 reuse and causal blocks
    operand_bytes: bytes of score operands (biases, masks) the program loads per score; they
               are pipelined through SRAM with the streamed tiles
    products:  tensor-core products per matrix product: 3 for fp32 inputs computed in 3xTF32
    """
    _check(head_dim)
    d_pad = _pow2_at_least(head_dim)
    limit = gpu.smem_per_block

    if interpret:
        t = KernelTiles(16, 16, 4, 1, elt_bytes * d_pad * 48)
        return TilePlan(d_pad, t, t, t, limit, gpu.name, "interpreter")

    shape = _shape(head_dim, elt_bytes, n_q, n_k, causal, group, batch_heads, operand_bytes, products)
    chosen = {}
    for kernel in ("fwd", "dkdv", "dq"):
        ranked = _ranked(kernel, shape, gpu)
        if not ranked:
            raise ValueError(
                f"flashfx: no tile plan fits {limit} bytes of shared memory at head dim {d_pad}"
            )
        chosen[kernel] = _tiles(ranked[0])
    desc = (f"N={shape.n_q}" + (f"x{shape.n_k}" if shape.n_k != shape.n_q else "")
            + f" d={d_pad} B·H={shape.batch_heads}" + (" causal" if shape.causal else "")
            + (f" GQA {shape.group}" if shape.group > 1 else "")
            + (f" operands {operand_bytes} B/score" if operand_bytes else "")
            + (" 3xTF32" if products == 3 else ""))
    return TilePlan(d_pad, chosen["fwd"], chosen["dkdv"], chosen["dq"], limit, gpu.name, desc)


def kv_splits(programs: int, n_k: int, block_n: int, sm_count: int, max_splits: int = 16) -> int:
    """Parts to split a forward's key range into, so that a grid of `programs` (query blocks ×
    batch·heads) fills the GPU: 1 while the grid covers half the SMs; else enough parts for one
    program per SM, each part at least 4 key blocks (a part pays a pipeline prologue, and the
    combine reads its [BM, d] fp32 partial back)."""
    if programs * 2 >= sm_count:
        return 1
    blocks = -(-n_k // block_n)
    return max(1, min(max_splits, -(-sm_count // programs), blocks // 4))
