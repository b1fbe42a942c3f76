"""The cost model of the attention kernels: sympy expressions, then a predicted time.

Symbols (all per (batch, query head) unless said otherwise):

    Nq, Nk   query and key rows                                   [rows]
    d        head dim, padded to a power of two (tl.dot's width)  [elements]
    BM, BN   query rows and key rows of one tile                  [rows]
    e        bytes per element of q, k, v                         [bytes]
    rho      fraction of (query tile, key block) pairs visited: 1 dense, ~1/2 causal
    G        query heads per K/V head (GQA)
    S        pipeline stages (buffered copies of the streamed tiles)
    T        threads of one program (32 · warps)
    M        SRAM of one SM in elements of e bytes
    X        bytes the score program loads per score: its operands' element sizes summed
             (a bias in bf16 and a bool mask: X = 3); 0 for scale and causal programs

Each kernel holds one side in SRAM or registers and streams the other (codegen/attention.py):

    fwd    holds a Q tile [BM, d], streams K, V blocks [BN, d]          grid Nq/BM · B·H
    dkdv   holds K, V blocks [BN, d], streams Q, dO tiles [BM, d]       grid Nk/BN · B·Hk
    dq     holds Q, dO tiles [BM, d], streams K, V blocks [BN, d]       grid Nq/BM · B·H

Traffic. `tile_bytes` is what moves between memory (L2 or HBM) and SRAM: the held side
once, the streamed side once per held tile. For the forward

    tile_bytes = e·d·(2·Nq + 2·rho·Nk·⌈Nq/BM⌉) + 8·Nq                        [bytes]

With BM = Θ(M/d) (a Q tile fills a fixed share of SRAM) this is FlashAttention's
Θ(Nq·Nk·d²/M). Saha and Ye (2024) prove Ω(N²d²/M) for any algorithm when M ≥ d², so
`lower_bound` = e·max(compulsory I/O, rho·Nq·Nk·d²/M) and the plan reports tile_bytes over
it (≥ 1, since a Q tile never exceeds SRAM: BM·d ≤ M). `hbm_bytes` is what reaches DRAM: the
compulsory reads and writes, plus the K/V re-reads that miss L2 (heads whose programs run
together share K/V in L2; only when that working set exceeds L2 do re-reads reach DRAM).

SRAM. Triton's shared memory for a pipelined loop, checked against what Triton 3.9 reports
(`kernel.metadata.shared`, compiled for sm90 and sm80 without a GPU; tests/planner keep the
measured points):

    wgmma (sm90+): the held tiles live in SRAM (warp-group MMA reads its A operand there)
        fwd   e·d·(BM + S·2·BN)                      exact at BM ≥ 64
        dq    e·d·(2·BM + S·2·BN)                    exact at BM ≥ 64
        dkdv  e·d·(2·BN + S·2·BM) + S·12·BM          upper bound (+ row stats, 3 fp32 a row)
    mma.sync (sm8x): the pipeliner keeps S-1 copies of the streamed tiles; the held tiles
    and a [BM, BN] tile pass through SRAM for layout conversion
        fwd   e·d·(BM + max(S-1, 1)·2·BN) + e·BM·BN           upper bound, exact at 32x32
        dq    e·d·(2·BM + max(S-1, 1)·2·BN) + e·BM·BN         upper bound, exact at 32x32
        dkdv  e·d·(2·BN + max(S-1, 1)·2·BM) + e·BM·BN + S·12·BM   within 2% above
    3xTF32 (fp32 inputs, Shape.products = 3) on sm90 stages each wgmma operand's TF32
    remainder beside it (sram_split; Triton 3.6, docs/planner_fp32_regs.json): the forward
    adds e·BM·d (Q), dQ 2·e·BM·d (Q, dO), dK/dV 2·e·BN·d + e·BM·BN (K, V, one more staged
    [BM, BN] tile); an upper bound on all 128 configs there, within 4 KB where BM, BN ≥ 64

Score operands (biases, masks) are loaded as [BM, BN] tiles inside the loop, and Triton
pipelines those loads through SRAM like the streamed tiles: every kernel adds S·BM·BN·X
(sm90+) or max(S-1, 1)·BM·BN·X (sm8x), an upper bound (an H100 run of the bias-and-mask
programs at D=16..256 overflowed without this term; broadcast operands may need less).

Registers per thread: the fp32 accumulators and live fp32 copies of the [BM, BN] score tile
(one in the forward, fitted by least squares to the ptxas counts of the sweeps' unspilled
configs; two in the backward: dp and ds), spread over T threads, plus a base for pointers,
offsets and row statistics. On mma.sync the held operand tiles add e·rows·d/(4T). fp32
inputs computed in 3xTF32 (Shape.products = 3) add one fp32 remainder per element of every
product's operands (regs_split); ptxas on sm_90 spills wherever this puts a tile past the
register file (docs/planner_fp32_regs.json), and at d = 128 every grid config spills a little.

Time. See `predict`: per-iteration compute terms (tensor cores, exp2 on the special-function
units, fp32 ALU work on the score tile), per-iteration and per-program overheads, SRAM
occupancy, load latency against pipeline depth, waves of programs over the SMs, and the HBM
roofline; the constants are calibrated in `Calibration`.

The warp-specialized Gluon kernels (sm_90), whose tiles are fixed: `predict_ws`, at the end.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from flashfx.planner.hardware import GPU

Nq, Nk, d, BM, BN, e, rho, G, S, T, M = sp.symbols("Nq Nk d BM BN e rho G S T M", positive=True)
X = sp.Symbol("X", nonnegative=True)


@dataclass(frozen=True)
class KernelModel:
    """The expressions of one kernel (see the module docstring for the symbols)."""

    name: str
    matmuls: int  # [rows, cols, d] products per (query tile, key block) pair
    held_row_matmuls: int  # of those, the ones whose rows are the held block's (BN in dK/dV)
    sram_wgmma: sp.Expr  # bytes of shared memory of one program, sm90+
    sram_mma: sp.Expr  # bytes, sm8x
    regs: sp.Expr  # 32-bit registers per thread (wgmma; mma.sync adds held operands)
    regs_held: sp.Expr  # registers per thread the held operand tiles add on mma.sync
    regs_split: sp.Expr  # registers per thread 3xTF32 adds: each operand's TF32 remainder
    sram_split: sp.Expr  # bytes of shared memory 3xTF32 adds on sm90+: remainders staged for wgmma
    tile_bytes: sp.Expr  # memory -> SRAM traffic per (batch, query head)
    compulsory: sp.Expr  # inputs read once and outputs written once per (batch, query head)
    alu_per_score: int  # fp32 operations per score element besides the MMAs (calibrated)

    @property
    def flops(self) -> sp.Expr:
        return 2 * self.matmuls * rho * Nq * Nk * d

    @property
    def lower_bound(self) -> sp.Expr:
        """Saha-Ye: no algorithm moves fewer bytes (M >= d²; compulsory I/O otherwise)."""
        return sp.Max(self.compulsory, e * rho * Nq * Nk * d**2 / M)


# bytes a query row of row statistics costs the backward: max, log-sum, delta (fp32); 8 for
# programs that save the log-sum-exp alone (ScoreProgram.stats_planes), where 12 is a bound
_stats = 12
# Tiles read through tensor descriptors (sm90+) land in 1024-byte-aligned swizzled buffers with
# an mbarrier per stage: Triton 3.6 measured up to 1024 bytes above the tiles themselves.
_tma = 1024
_wg_m = sp.Min(sp.Max(BM - 63, 0), 1)  # 1 when BM >= 64: the BM-row products run as wgmma
_wg_n = sp.Min(sp.Max(BN - 63, 0), 1)  # 1 when BN >= 64

FWD = KernelModel(
    "fwd", 2, 0,
    sram_wgmma=e * d * (BM + S * 2 * BN) + S * BM * BN * X + _tma,
    sram_mma=e * d * (BM + sp.Max(S - 1, 1) * 2 * BN) + e * BM * BN + sp.Max(S - 1, 1) * BM * BN * X,
    regs=(BM * d + BM * BN) / T + 62,  # least squares over the sweeps' unspilled configs
    regs_held=e * BM * d / (4 * T),
    regs_split=(BM * d + 2 * BN * d + BM * BN) / T,  # Q, K, V, P
    sram_split=_wg_m * e * BM * d,  # Q's remainder
    tile_bytes=e * d * (2 * Nq + 2 * rho * Nk * sp.ceiling(Nq / BM)) + 8 * Nq + rho * Nq * Nk * X,
    compulsory=e * d * (2 * Nq + 2 * Nk / G) + 8 * Nq,
    alu_per_score=6,
)
# dK/dV on sm90 (Triton 3.6 on the H200, every config of docs/planner_sweep.json): the held
# K, V and S copies of the streamed Q, dO, plus the transposed [BM, BN] probabilities staged
# for the BN-row dots (e·BM·BN). When BN is below a warp group's 64 rows and BM is not, the
# dots producing dK and dV run as mma.sync from registers and the held tiles leave SRAM;
# what remains measures e·d·BM·(2S - 1), and 5·e·d·BM unpipelined (S = 1).
_one_stage = sp.Max(2 - S, 0)  # 1 at S = 1, else 0
_short_held = sp.Min(sp.Max(64 - BN, 0), 1) * sp.Min(sp.Max(BM - 63, 0), 1)  # 1 when BN < 64 <= BM
DKDV = KernelModel(
    "dkdv", 4, 2,
    sram_wgmma=((1 - _short_held) * e * d * (2 * BN + S * 2 * BM)
                + _short_held * e * d * BM * (2 * S - 1 + 4 * _one_stage)
                + S * _stats * BM + e * BM * BN + S * BM * BN * X + _tma),
    sram_mma=(e * d * (2 * BN + sp.Max(S - 1, 1) * 2 * BM) + e * BM * BN + S * _stats * BM
              + sp.Max(S - 1, 1) * BM * BN * X),
    regs=(2 * BN * d + 3 * BM * BN) / T + 80,
    regs_held=2 * e * BN * d / (4 * T),
    regs_split=2 * (BM * d + BN * d + BM * BN) / T,  # Q, dO, K, V, P, dS
    # K's and V's remainders and a second staged [BM, BN] tile; upper bound below 64 keys
    sram_split=_wg_n * 2 * e * BN * d + (1 - _wg_n) * e * BM * d + e * BM * BN,
    tile_bytes=4 * e * Nk * d / G + rho * Nq * sp.ceiling(Nk / BN) * (2 * e * d + _stats) + rho * Nq * Nk * X,
    compulsory=e * d * (2 * Nq + 4 * Nk / G) + _stats * Nq,
    alu_per_score=10,
)
# dK/dV with keys down the rows (KEYS_DOWN: [BN, BM] tiles, K·Qᵀ): all four products have the
# held block's BN rows, and P and dS feed dV and dK from registers, so no [BM, BN] tile is
# staged in SRAM. Against the keys-down configs of the H200 sweep (docs/planner_sweep.json,
# Triton 3.6, bf16): registers (2·BN·d + 4·BM·BN)/T + BM/2 + 36, the per-query vectors spread
# along the columns growing with BM (within 40 of every unspilled config, 7 above on average);
# the SRAM is the queries-down kernel's without the staged tile, an upper bound on every config.
DKDV_KD = KernelModel(
    "dkdv_kd", 4, 4,
    sram_wgmma=(e * d * (2 * BN + S * 2 * BM) + S * _stats * BM + S * BM * BN * X + _tma),
    sram_mma=DKDV.sram_mma,
    regs=(2 * BN * d + 4 * BM * BN) / T + BM / 2 + 36,
    regs_held=DKDV.regs_held,
    # keys down is planned for 16-bit inputs only (plan._ranked): no 3xTF32 data of its own
    regs_split=DKDV.regs_split,
    sram_split=DKDV.sram_split,
    tile_bytes=DKDV.tile_bytes,
    compulsory=DKDV.compulsory,
    alu_per_score=DKDV.alu_per_score,
)
DQ = KernelModel(
    "dq", 3, 0,
    sram_wgmma=e * d * (2 * BM + S * 2 * BN) + S * BM * BN * X + _tma,
    sram_mma=e * d * (2 * BM + sp.Max(S - 1, 1) * 2 * BN) + e * BM * BN + sp.Max(S - 1, 1) * BM * BN * X,
    regs=(BM * d + 3 * BM * BN) / T + 56,
    regs_held=2 * e * BM * d / (4 * T),
    regs_split=(2 * BM * d + 2 * BN * d + BM * BN) / T,  # Q, dO, K, V, dS
    # Q's and dO's remainders; one [BM, d] tile when no product runs as wgmma
    sram_split=_wg_m * 2 * e * BM * d + (1 - _wg_m) * (1 - _wg_n) * e * BM * d,
    # Q, dO and O read (O once, for Δ), dQ written
    tile_bytes=e * d * (4 * Nq + 2 * rho * Nk * sp.ceiling(Nq / BM)) + _stats * Nq + rho * Nq * Nk * X,
    compulsory=e * d * (4 * Nq + 2 * Nk / G) + _stats * Nq,
    alu_per_score=8,
)
KERNELS = {k.name: k for k in (FWD, DKDV, DKDV_KD, DQ)}


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Constants fitted to an exhaustive sweep on an H200 (bf16, Triton 3.6, N=4096, B·N=16384,
    H·d=2048), which found: fwd d=64 best at 64x64, 4 warps, 3 stages (~421 TFLOP/s); fwd
    d=128 at 128x64, 8 warps, 3 stages (~467 TFLOP/s); dK/dV at BM=64, BN=64 and dQ at BM=64,
    BN=32, 4 warps, 2 stages.

    mma_efficiency: fraction of the data-sheet matrix rate a Triton tl.dot loop sustains
        (wgmma fed from SRAM). 0.75 puts fwd d=128 at ~470 TFLOP/s with the terms below.
    overlap: how much co-resident programs hide one another's serial phases (MMA, then
        exp2 and softmax ALU work, then MMA): a tile step costs L / P**overlap where P is the
        number of programs on the SM. Ideal overlap would be 1; Triton programs synchronise on
        shared SM resources, and 0.3 is what reproduces the measured rates: d=64 (3 programs
        of 4 warps per SM) at ~420 TFLOP/s while its serial phases alone give ~330.
    warpgroup_overlap: a second warp group inside one program counts as this fraction of an
        independent program (its phases are barrier-coupled to the first).
    warpgroup_interleave: the fraction of the shorter of a step's two phases (the products;
        exp2 and the fp32 softmax work) that runs under the longer one when a program has two
        or more warp groups, which take turns. 0 for the backward kernels (not fitted).
    step_cycles: fixed cost of one loop iteration of one program (loop control, barrier,
        wgmma wait); load_issue: cycles per 16-byte async copy a thread issues. Together these
        are the per-tile overhead that makes small tiles lose (64x32 vs 64x64 at d=64) and
        makes 8 warps issue the loads of a 128-row tile faster than 4 (fwd d=128).
    latency: cycles from issuing a tile's load to its use, under load, which S-1 iterations
        of one program must cover; what is left is exposed. With ~2000 cycles fwd needs 3
        stages at both head dims. latency_bwd: the same for the backward kernels, whose
        steps issue 3-4 dependent MMAs and 3 row-statistic loads between tile loads, hiding
        most of a load inside one step; fitted to the sweep, where 2 stages won for both
        backward kernels (a third costs registers and SRAM and gains nothing measurable).
        transfer: a tile also takes its bytes over the L2 rate to arrive, times this (0 for
        the backward kernels, not fitted); it is why 128x128 tiles at d=128 need 3 stages
        (2 lose 17% in the sweeps).
    spill_cycles, regs_headroom: cycles per iteration per register predicted past
        (limit - headroom): ptxas spills or serialises once a tile's live values come within
        ~16 registers of the 255 limit (fwd 128x32 and 128x128 at d=128 compile to 244-254
        registers and lose to 128x64 with 8 warps at 183). regs_tolerance: predictions past
        1.1 x the limit are rejected outright (heavy spilling).
    mma_sync_ratio: on sm90+, a dot of fewer rows than a warp group's 64 (per 4 warps) cannot
        use wgmma; Triton emits mma.sync for it, at this fraction of the wgmma rate (the dQ
        fit puts it near 0.55; for dK/dV the fit left it at 1, occupancy explaining its
        32-row tiles).
    program_cycles: prologue and epilogue of one program (load the held tile, store results).
    fill: weight of the pipeline fill and drain of one program (a load latency, the held tiles
        in and out, S-1 stages of streamed tiles at the L2 rate), divided among the programs
        an SM holds. It makes few long programs of big tiles pay for their start: fwd d=128
        128x128 with 8 warps (one program per SM) loses 8% to 64x64 at N=1024 and wins 12%
        at N=16384, where each program runs 128 steps.
    launch_s: launch and tail of one kernel.
    l2_bytes_per_cycle: the L2 -> SM bandwidth share of one SM. Every program streams its own
        copy of the K/V (or Q/dO) tiles from L2, so 64-row tiles at d=128 (32 KiB per 2 MFLOP)
        cap near 460 TFLOP/s on an H200 while 128-row tiles halve that traffic: why fwd d=128
        prefers 128x64 with 8 warps although it fits only one program per SM. (The forward's
        latest fit, on sequences up to 16384, took this bound out; see CALIBRATION.)
    """

    mma_efficiency: float = 0.75
    overlap: float = 0.3
    warpgroup_overlap: float = 0.25
    step_cycles: float = 60.0
    load_issue: float = 4.0
    latency: float = 2500.0
    latency_bwd: float = 600.0
    spill_cycles: float = 30.0
    regs_tolerance: float = 1.1
    regs_headroom: int = 16
    mma_sync_ratio: float = 0.6
    program_cycles: float = 1500.0
    fill: float = 0.0
    warpgroup_interleave: float = 0.0
    transfer: float = 0.0  # see `latency`
    launch_s: float = 4e-6
    l2_bytes_per_cycle: float = 28.0  # L2 -> SM bandwidth per SM (~6.8 TB/s on an H200)
    smem_reserved: int = 1024  # bytes the driver reserves per program (sm80+)


# Fitted by benchmarks/planner_fit.py to H200 sweeps (every sound tile config timed), each
# kernel's constants to its own ranking: dQ on the 2026-11-24 sweep (24 shapes), dK/dV on a
# 2026-12-01 one, the forward on docs/planner_sweep.json and docs/planner_sweep_long.json
# together (30 shapes, N up to 16384). The forward's fit moved the L2 rate out of the
# throughput bound (169.8 bytes a cycle, about 4x the H200's) and into the latency a pipeline
# must cover: transfer / l2_bytes_per_cycle is one byte per 43.6 cycles.
# The backward kernels issue 3-4 dependent MMAs a step, hold two accumulators and spill at
# 64x64, and no one set of constants ranks all three well.
CALIBRATION = Calibration(
    mma_efficiency=0.95, overlap=0.551, warpgroup_overlap=0.0611, step_cycles=553.6, load_issue=0.644,
    latency=2839.0, spill_cycles=35.3, regs_tolerance=1.0, mma_sync_ratio=1.0, program_cycles=97.0,
    l2_bytes_per_cycle=169.8, fill=0.255, warpgroup_interleave=0.125, transfer=3.895)
CALIBRATION_DKDV = Calibration(
    mma_efficiency=0.501, overlap=0.578, warpgroup_overlap=0.204, step_cycles=507.3, load_issue=1.504,
    latency_bwd=3711.0, spill_cycles=7.449, regs_tolerance=1.412, mma_sync_ratio=1.0, program_cycles=217.6,
    l2_bytes_per_cycle=33.13)
CALIBRATION_DQ = Calibration(
    mma_efficiency=0.671, overlap=0.276, warpgroup_overlap=0.113, step_cycles=229.8, load_issue=1.478,
    latency_bwd=3640.0, spill_cycles=16.83, regs_tolerance=1.0, mma_sync_ratio=0.55, program_cycles=245.3,
    l2_bytes_per_cycle=48.05)


def calibration(kernel: str) -> Calibration:
    """The constants fitted for `kernel` ("fwd", "dkdv" or "dq")."""
    return {"fwd": CALIBRATION, "dkdv": CALIBRATION_DKDV, "dq": CALIBRATION_DQ}[kernel]


# ---------------------------------------------------------------------------------------------
# Numeric evaluation
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _fn(kernel: str, what: str):
    k = KERNELS[kernel]
    expr = getattr(k, what)
    return sp.lambdify((Nq, Nk, d, BM, BN, e, rho, G, S, T, M, X), expr,
                       modules=[{"ceiling": math.ceil, "Max": max, "Min": min}, "math"])


def evaluate(kernel: str, what: str, **values) -> float:
    """`what` of `kernel` ("sram_wgmma", "regs", "tile_bytes", ...) at numeric symbol values."""
    args = [values.get(s.name, 1) for s in (Nq, Nk, d, BM, BN, e, rho, G, S, T, M)] + [values.get("X", 0)]
    return float(_fn(kernel, what)(*args))


def density(n_q: int, n_k: int, block_m: int, block_n: int, causal: bool) -> float:
    """Fraction of (query tile, key block) pairs a kernel visits (causal: bottom-right aligned
    when n_k > n_q, as in a KV cache; top-left otherwise, the same when n_q == n_k)."""
    if not causal:
        return 1.0
    tiles, blocks = -(-n_q // block_m), -(-n_k // block_n)
    diag = max(n_k - n_q, 0)
    seen = sum(min(blocks, -(-min(n_k, (i + 1) * block_m + diag) // block_n)) for i in range(tiles))
    return seen / (tiles * blocks)


@dataclass(frozen=True)
class Prediction:
    kernel: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    sram_bytes: int  # shared memory of one program
    regs: int  # registers per thread (predicted)
    programs_per_sm: int  # occupancy
    time_s: float
    flops: float
    tile_bytes: float  # memory -> SRAM, whole call
    hbm_bytes: float  # reaching DRAM, whole call
    lower_bound_bytes: float  # Saha-Ye / compulsory, whole call
    fits: bool  # within SRAM and register limits
    keys_down: bool = False  # dK/dV: [BN, BM] tiles (DKDV_KD)

    @property
    def bound_ratio(self) -> float:
        return self.tile_bytes / self.lower_bound_bytes


@dataclass(frozen=True)
class Shape:
    """The call the plan is for: rows, head dim, dtype size, mask, GQA group, batch x heads."""

    n_q: int
    n_k: int
    head_dim: int  # padded
    elt: int
    causal: bool = False
    group: int = 1
    batch_heads: int = 1  # B·H (query heads)
    operand_bytes: int = 0  # X: bytes of score operands loaded per score
    products: int = 1  # tensor-core products per matrix product: 3 for 3xTF32 (fp32 inputs)


def predict(kernel: str, shape: Shape, gpu: GPU, block_m: int, block_n: int, warps: int,
            stages: int, cal: Calibration | None = None, keys_down: bool = False) -> Prediction:
    """Predicted resources and time of `kernel` with these tiles on `gpu` (keys_down: dK/dV
    with [BN, BM] tiles, DKDV_KD's SRAM, registers and product rows)."""
    cal = cal or calibration(kernel)
    if keys_down and kernel != "dkdv":
        raise ValueError(f"keys_down orients dK/dV's tiles; {kernel!r} has one orientation")
    model = "dkdv_kd" if keys_down else kernel
    k = KERNELS[model]
    a = gpu.arch
    threads = 32 * warps
    r = density(shape.n_q, shape.n_k, block_m, block_n, shape.causal)
    vals = dict(Nq=shape.n_q, Nk=shape.n_k, d=shape.head_dim, BM=block_m, BN=block_n,
                e=shape.elt, rho=r, G=shape.group, S=stages, T=threads, X=shape.operand_bytes,
                M=gpu.smem_per_sm / shape.elt)
    sram = evaluate(model, "sram_wgmma" if a.wgmma else "sram_mma", **vals)
    if shape.products > 1 and a.wgmma:
        sram += evaluate(model, "sram_split", **vals)
    sram = int(sram)
    regs = evaluate(model, "regs", **vals) + (0 if a.wgmma else evaluate(model, "regs_held", **vals))
    if shape.products > 1:
        regs += evaluate(model, "regs_split", **vals)
    regs = int(math.ceil(regs))
    spilled = max(0, regs - (gpu.max_regs_per_thread - cal.regs_headroom))
    fits = sram <= gpu.smem_per_block and regs <= cal.regs_tolerance * gpu.max_regs_per_thread

    # ---- occupancy: programs per SM, from SRAM, registers (8-register, per-warp grain), threads
    alloc = 8 * math.ceil(min(regs, gpu.max_regs_per_thread) / 8) * 32  # registers per warp
    occ = min(gpu.smem_per_sm // (sram + cal.smem_reserved),
              (gpu.regs_per_sm // alloc) // warps,
              gpu.max_threads_per_sm // threads, gpu.max_blocks_per_sm)
    occ = max(occ, 1) if sram <= gpu.smem_per_block else 0

    # ---- one (query tile, key block) step of one program, in SM cycles at full rate
    dt = "bf16" if shape.elt <= 2 else "tf32"
    mma_rate = gpu.flops(dt) / (gpu.sm_count * gpu.clock_hz)  # FLOP per cycle per SM
    scores = block_m * block_n
    # dots too short for a warp group run as mma.sync (sm90+; on sm8x every dot is mma.sync)
    rows = [block_m] * (k.matmuls - k.held_row_matmuls) + [block_n] * k.held_row_matmuls
    dots = sum(1 if not a.wgmma or r >= 16 * warps else 1 / cal.mma_sync_ratio for r in rows)
    mma = 2 * shape.products * dots * scores * shape.head_dim / (mma_rate * cal.mma_efficiency)
    sfu = scores / a.sfu_per_clk
    alu = (k.alu_per_score * scores + block_m * shape.head_dim) / a.fp32_per_clk
    stream_rows = block_m if kernel == "dkdv" else block_n
    loads = 2 * stream_rows * shape.head_dim * shape.elt / (16 * threads)  # 16-byte copies a thread
    # two or more warp groups in one program take turns: one's exp2 and softmax run while the
    # other's products do (FlashAttention 3's ping-pong, which Triton's scheduling gives in part)
    hidden = cal.warpgroup_interleave * min(mma, sfu + alu) if warps >= 8 else 0.0
    step = (mma + sfu + alu - hidden + cal.step_cycles + cal.load_issue * loads
            + cal.spill_cycles * spilled)
    parallel = max(occ, 1) * (1 + cal.warpgroup_overlap * (max(warps // 4, 1) - 1))
    l2 = 2 * stream_rows * shape.head_dim * shape.elt / cal.l2_bytes_per_cycle  # streamed tiles in
    per_step = max(mma * cal.mma_efficiency / 0.95, l2, step / parallel**cal.overlap)  # SM cycles
    wall_step = per_step * max(occ, 1)  # one program's step, sharing the SM with the others
    latency = cal.latency if kernel == "fwd" else cal.latency_bwd
    # a tile arrives a load latency plus its transfer after its copy is issued; S-1 steps of
    # this program cover it, and what they do not is exposed
    exposed = max(0.0, latency + cal.transfer * l2 - (stages - 1) * wall_step)
    per_step += exposed / max(occ, 1)

    # ---- programs, waves and steps
    bh = shape.batch_heads if kernel != "dkdv" else max(shape.batch_heads // shape.group, 1)
    held_rows, other_rows = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
    n_held, n_other = (shape.n_k, shape.n_q) if kernel == "dkdv" else (shape.n_q, shape.n_k)
    programs = -(-n_held // held_rows) * bh
    steps = r * -(-n_other // other_rows) * (shape.group if kernel == "dkdv" else 1)
    slots = gpu.sm_count * max(occ, 1)
    waves = programs / slots if shape.causal else math.ceil(programs / slots)
    # prologue and epilogue: before its first step a program waits one load latency and moves
    # its held tiles plus S-1 stages of streamed tiles in; after its last it writes its held-
    # size results. Co-resident programs run their steps meanwhile, hiding 1 - 1/occ of it.
    held_in, held_out = {"fwd": (1, 1), "dq": (2, 1), "dkdv": (2, 2)}[kernel]
    fill_bytes = shape.head_dim * shape.elt * (
        (held_in + held_out) * held_rows + (stages - 1) * 2 * stream_rows)
    fill = (latency + fill_bytes / cal.l2_bytes_per_cycle) * cal.fill / max(occ, 1)
    cycles = waves * max(occ, 1) * (steps * per_step + cal.program_cycles + fill)
    compute_s = cycles / gpu.clock_hz

    # ---- bytes: tiles, DRAM (K/V re-reads reach DRAM only when heads in flight overflow L2)
    per_head = dict(vals, Nq=shape.n_q, Nk=shape.n_k)
    tile = evaluate(kernel, "tile_bytes", **per_head) * shape.batch_heads
    comp = evaluate(kernel, "compulsory", **per_head) * shape.batch_heads
    lb = evaluate(kernel, "lower_bound", **per_head) * shape.batch_heads
    kv_head = 2 * n_other * shape.head_dim * shape.elt
    heads_in_flight = min(slots / max(-(-n_held // held_rows), 1) + 1, bh)
    working = heads_in_flight * kv_head
    miss = 0.0 if working <= gpu.l2_bytes / 2 else 1 - gpu.l2_bytes / 2 / working
    hbm = comp + miss * max(tile - comp, 0.0)
    memory_s = hbm / gpu.hbm_bytes_per_s
    # heavy spills are ranked (a fallback may need them) but only SRAM overflow is impossible
    time = max(compute_s, memory_s) + cal.launch_s if sram <= gpu.smem_per_block else math.inf
    return Prediction(kernel, block_m, block_n, warps, stages, sram, regs, occ, time,
                      evaluate(kernel, "flops", **per_head) * shape.batch_heads, tile, hbm, lb, fits, keys_down)


# ---------------------------------------------------------------------------------------------
# The warp-specialized Gluon kernels (sm_90; codegen/hopper.py, codegen/hopper_bwd.py)
# ---------------------------------------------------------------------------------------------
#
# Their tiles are fixed, so the model predicts their time rather than ranking tiles. One program
# holds 128 rows in two consumer warpgroups of 64 and takes every register of an SM (with its
# producer warp), so one program runs on an SM at a time. A producer warp keeps `stages` blocks
# in flight, so a step's loads do not show (the generated kernels' load-issue and latency terms
# drop out), and the two warpgroups take turns on the tensor cores, so that one's exp2 and
# softmax run under the other's products. With tiles, occupancy and overlap fixed, a step's
# cost depends on the kernel and head dim alone, and so does a unit's: both are fitted to H200
# measurements (benchmarks/planner_ws_fit.py, docs/planner_ws.json):
#
#     time = launch + (steps · step_cycles + units · unit_cycles) / clock
#
# where `steps` and `units` are those of the SM that finishes last: a unit is a pair of one
# head's query tiles (the persistent forward hands them out round-robin, `hopper.schedule`) or
# a program (dK/dV: 128 keys; dQ: 128 query rows, placed on SMs as they free up), and a step is
# one streamed block visited. On the 39 measured points the predictions are within 1.8% at the
# median (21% at most, on a 59 µs forward); fitted without the point itself, 2.4% and 22%.
#
# The runtime does not choose between these kernels and the generated ones by this model: the
# generated kernels' constants are fitted to rank tiles, and their predicted times are off by up
# to 2x (dQ at head dim 64), so the comparison would reverse 7 of the 33 measured choices
# (docs/planner_ws.md). Those choices stay the measured rules of hopper.supports and
# hopper_bwd.dq_supports; the model's prediction is what `explain` reports for the Gluon kernels.


@dataclass(frozen=True)
class WsKernel:
    held: int  # rows a program holds (two warpgroups)
    block: int  # rows of a streamed block
    stages: int
    sram_rows: int  # rows of d elements in shared memory (held, output staging, stages)
    sram_fixed: int  # barriers and row statistics, bytes
    persistent: bool  # one program an SM walking pairs of query tiles; else a program a held tile


WS_KERNELS = {
    # Q 128 + O staging 128 + K, V 2 stages x 128
    "fwd": WsKernel(128, 128, 2, 128 + 128 + 2 * 2 * 128, 392, True),
    # K, V 128 each + Q, dO 2 stages x 64 (and their row statistics)
    "dkdv": WsKernel(128, 64, 2, 2 * 128 + 2 * 2 * 64, 1392, False),
    # Q, dO 128 each + K, V 3 stages x 64
    "dq": WsKernel(128, 64, 3, 2 * 128 + 3 * 2 * 64, 600, False),
}


@dataclass(frozen=True)
class WsCalibration:
    step_cycles: float  # one streamed block of one program
    unit_cycles: float  # one unit's start and end (held tiles in, results out)


# Fitted by benchmarks/planner_ws_fit.py to docs/planner_ws.json: {(kernel, head dim): constants}
WS_CALIBRATION = {
    ("fwd", 64): WsCalibration(step_cycles=2282.1, unit_cycles=5632.9),
    ("fwd", 128): WsCalibration(step_cycles=3139.8, unit_cycles=6739.2),
    ("dkdv", 64): WsCalibration(step_cycles=1558.1, unit_cycles=9204.3),
    ("dkdv", 128): WsCalibration(step_cycles=2890.7, unit_cycles=6311.6),
    ("dq", 64): WsCalibration(step_cycles=1201.8, unit_cycles=8634.1),
    ("dq", 128): WsCalibration(step_cycles=2000.8, unit_cycles=5863.7),
}


def _visited(rows: int, n_rows: int, n_other: int, block: int, causal: bool, keys_held: bool) -> list[int]:
    """Blocks each held tile visits (tile i holds rows i·rows ...; causal: top-left when the two
    lengths are equal, bottom-right aligned when there are more keys than queries)."""
    tiles = -(-n_rows // rows)
    blocks = -(-n_other // block)
    if not causal:
        return [blocks] * tiles
    if keys_held:  # keys held, queries streamed: a query sees keys up to its row + diag
        n_q, n_k = n_other, n_rows
        diag = max(n_k - n_q, 0)
        return [blocks - min(blocks, max(i * rows - diag, 0) // block) for i in range(tiles)]
    diag = max(n_other - n_rows, 0)
    return [min(blocks, -(-min(n_other, (i + 1) * rows + diag) // block)) for i in range(tiles)]


def heads_first(kernel: str, shape: Shape, gpu: GPU) -> bool:
    """Whether a backward kernel's programs ("dkdv" or "dq", generated or warp-specialized) start
    heads first: every head's first program, then every head's second (its grid's first axis
    is batch·heads). Under a causal mask a head's programs differ in length (the first key
    block sees every query, the last one a block of them) and the GPU starts programs in grid
    order, so a head-by-head order starts the last heads' longest programs last and leaves SMs
    idle at the end (ws_work: at B·H=24, N=4096, D=64, the dK/dV's last SM finishes 15% later than
    with heads first). Heads first spreads each head's programs over the whole launch, so the
    tensors they stream (Q and dO for dK/dV, K and V for dQ) are read again from L2 rather than
    by programs running together: it is taken only where all heads' streamed tensors fit in L2."""
    if not shape.causal or kernel not in ("dkdv", "dq"):
        return False
    heads = shape.batch_heads if kernel == "dkdv" else max(shape.batch_heads // shape.group, 1)
    rows = shape.n_q if kernel == "dkdv" else shape.n_k
    return 2 * heads * rows * shape.head_dim * shape.elt <= gpu.l2_bytes


def ws_work(kernel: str, shape: Shape, sm_count: int, heads_first: bool = False) -> tuple[int, int]:
    """(steps, units) of the SM that finishes last, for a warp-specialized kernel's call whose
    programs start in grid order (heads_first: see `heads_first`)."""
    k = WS_KERNELS[kernel]
    if k.persistent:
        per_tile = _visited(k.held, shape.n_q, shape.n_k, k.block, shape.causal, False)
        tiles = len(per_tile)
        pairs = [per_tile[m] + (per_tile[tiles - 1 - m] if tiles - 1 - m != m else 0)
                 for m in range(-(-tiles // 2))]
        items = pairs * shape.batch_heads  # round-robin over min(items, SMs) programs
        programs = min(len(items), sm_count)
        loads = [(sum(items[s::programs]), len(items[s::programs])) for s in range(programs)]
        return max(loads)
    keys_held = kernel == "dkdv"
    n_rows, n_other = (shape.n_k, shape.n_q) if keys_held else (shape.n_q, shape.n_k)
    per_program = _visited(k.held, n_rows, n_other, k.block, shape.causal, keys_held)
    if not keys_held and shape.causal:
        per_program = per_program[::-1]  # dQ walks a head's query tiles from the last (longest)
    heads = max(shape.batch_heads // shape.group, 1) if keys_held else shape.batch_heads
    repeat = shape.group if keys_held else 1  # dK/dV walks its group's query heads
    per_head = [s * repeat for s in per_program]
    steps = [s for s in per_head for _ in range(heads)] if heads_first else per_head * heads
    # programs start in grid order on the SM that frees first (a unit counts as 2 steps here)
    free = [(0.0, 0, 0, s) for s in range(min(sm_count, len(steps)))]
    for s in steps:
        t, n, u, sm = heapq.heappop(free)
        heapq.heappush(free, (t + s + 2, n + s, u + 1, sm))
    _, n, u, _ = max(free)
    return n, u


def predict_ws(kernel: str, shape: Shape, gpu: GPU, cal: WsCalibration | None = None,
               order: bool | None = None) -> Prediction:
    """Predicted resources and time of the warp-specialized `kernel` ("fwd", "dkdv", "dq") at
    head dim 64 or 128 with 16-bit inputs (the calls it takes); `cal` replaces the fitted
    constants of that kernel and head dim; `order`: programs heads first (None: as the runtime
    launches them, `heads_first`)."""
    k = WS_KERNELS[kernel]
    cal = cal or WS_CALIBRATION.get((kernel, shape.head_dim))
    if cal is None:
        raise ValueError(f"flashfx: no warp-specialized {kernel} at head dim {shape.head_dim}")
    sram = shape.elt * shape.head_dim * k.sram_rows + k.sram_fixed
    first = heads_first(kernel, shape, gpu) if order is None else order
    steps, units = ws_work(kernel, shape, gpu.sm_count, first)
    time = CALIBRATION.launch_s + (steps * cal.step_cycles + units * cal.unit_cycles) / gpu.clock_hz
    bm, bn = (k.block, k.held) if kernel == "dkdv" else (k.held, k.block)
    r = density(shape.n_q, shape.n_k, bm, bn, shape.causal)
    per_head = dict(Nq=shape.n_q, Nk=shape.n_k, d=shape.head_dim, BM=bm, BN=bn, e=shape.elt, rho=r,
                    G=shape.group, S=k.stages, T=256, X=0, M=gpu.smem_per_sm / shape.elt)
    tile = evaluate(kernel, "tile_bytes", **per_head) * shape.batch_heads
    comp = evaluate(kernel, "compulsory", **per_head) * shape.batch_heads
    lb = evaluate(kernel, "lower_bound", **per_head) * shape.batch_heads
    flops = evaluate(kernel, "flops", **per_head) * shape.batch_heads
    # 8 warps in two consumer warpgroups at 240 registers a thread (setmaxnreg), one program an SM
    return Prediction(kernel, bm, bn, 8, k.stages, sram, 240, 1, time, flops, tile, comp, lb,
                      sram <= gpu.smem_per_block)
