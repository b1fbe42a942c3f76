"""The backward on Hopper (sm_90), written in Gluon: warp-specialized dQ and dK/dV.

    attn_bwd_dq     dQ and Δ = rowsum(dO ∘ O)                                grid (Nq/2BM, B·H)
    attn_bwd_dkdv   dK, dV of softmax(scale · Q Kᵀ [causal]) V           grid (Nk/2BK, B·Hk)

attn_bwd_dq runs first: it writes Δ, which attn_bwd_dkdv reads. Each kernel's program owns its
rows (query rows for dQ, keys for dK/dV) and sums over everything they see, so every gradient is
written once, without atomics (deterministic). Each has three partitions:

- a producer warp loads the rows the program owns once, then streams the other side's blocks
  into a ring of STAGES shared-memory stages through tensor descriptors (TMA), one "ready" and
  one "empty" barrier a stage. dQ streams K and V blocks; dK/dV streams each query block's Q,
  dO, row log-sum-exp and Δ;
- two consumer warpgroups each own half of the program's rows and hold their gradients in
  registers. For a block a consumer issues its two score-sized products together (S and dP),
  recomputes P from S while dP is still on the tensor cores, then adds dS times the block into
  its gradient (and, for dK/dV, P times dO into dV), with P and dS fed from registers. The row
  terms (log-sum-exp, Δ) start the two products' accumulators. The stage's "empty" barrier
  counts both consumers.

dK/dV puts the keys down the rows (Sᵀ = K·Qᵀ), so no transpose of P or dS is needed. Its query
blocks come in three runs per query head: those that cross the causal diagonal (masked), those
every key of the program sees whole (no masks), and the ragged end of Nq (masked). dQ's key
blocks come in two runs per warpgroup, whole then masked; a warpgroup releases, unread, the
blocks only the other warpgroup's rows see (under a causal mask, the last ones).

The programs they cover are the forward kernel's (codegen.hopper.covers: a positive scale,
optionally a causal mask, 16-bit inputs, head dim 64 or 128, sm_90), at every grid, without the
forward's head-dim-64 rule. dK/dV was measured at least as fast as the generated dK/dV at every
shape (docs/benchmarks.md, "The warp-specialized dK/dV"); it reads the row statistics as
[B·H, Nq] rows, whose 16-byte alignment needs Nq a multiple of 4. dQ was faster than the
generated dQ at head dim 128 and slower at 64, so it takes head dim 128 only (`dq_supports`;
"The warp-specialized dQ").
"""

from __future__ import annotations

import torch

from flashfx.codegen import hopper
from flashfx.codegen.hopper import gluon
from flashfx.ir import ScoreProgram

if gluon is not None:
    from flashfx.codegen.hopper import (_masked, _tma_load, fence_async_shared, gl, mbarrier, warpgroup_mma,
                                        warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Measured on the H200 (docs/benchmarks.md, "The warp-specialized dK/dV"): query blocks of 64
# rows, 2 stages (32 KB each at D=128), consumers at 240 registers a thread (no spills: the row
# terms ride in the products' accumulators, see _step) and the producer at 24.
BLOCK_M = 64   # query rows a stage
BLOCK_K = 64   # keys a consumer warpgroup; a program holds two
STAGES = 2
CONSUMER_REGS = 240
PRODUCER_REGS = 24
MAXNREG = 168
# dQ: 2 x 64 query rows a program, 64-key blocks, 3 stages (32 KB each at D=128).
DQ_BLOCK_M = 64   # query rows a consumer warpgroup; a program holds two
DQ_BLOCK_N = 64
DQ_STAGES = 3
LOG2E = 1.4426950408889634


def supports(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
             n_k: int) -> str | None:
    """None when this kernel computes such a call's dK and dV; else why not, in words. (Whether
    the tensors' layout lets the copy engine read them is the launch's to check.)"""
    why = hopper.covers(program, dtype, device, head_dim, n_q, n_k)
    if why is None and n_q % 4:
        return f"{n_q} queries: the row statistics' descriptors need rows of a multiple of 16 bytes"
    return why


def dq_supports(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
                n_k: int) -> str | None:
    """None when attn_bwd_dq computes such a call's dQ and Δ; else why not. At head dim 64 the
    generated dQ was faster (docs/benchmarks.md, "The warp-specialized dQ")."""
    why = hopper.covers(program, dtype, device, head_dim, n_q, n_k)
    if why is None and head_dim != 128:
        return f"head dim {head_dim}: the generated dQ was measured faster there"
    return why


def constexprs(head_dim: int, causal_code: int, heads_first: bool = False) -> dict:
    """The kernel's compile-time arguments and launch options for a head dim and causal code
    (0 none, 1 top left, 2 bottom right); heads_first: the program order of `grid`."""
    return dict(BM=BLOCK_M, BK=BLOCK_K, D=head_dim, STAGES=STAGES, CAUSAL=causal_code, HEADS_FIRST=heads_first,
                CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)


def grid(n_k: int, batch_kv_heads: int) -> tuple[int, int]:
    """Programs of 2·BLOCK_K keys of each batch and K/V head: (blocks, heads), launched
    transposed when heads first (gpu._order, and the kernel's HEADS_FIRST)."""
    return (-(-n_k // (2 * BLOCK_K)), batch_kv_heads)


def dq_constexprs(head_dim: int, causal_code: int, heads_first: bool = False) -> dict:
    """attn_bwd_dq's compile-time arguments and launch options (see constexprs)."""
    return dict(BM=DQ_BLOCK_M, BN=DQ_BLOCK_N, D=head_dim, STAGES=DQ_STAGES, CAUSAL=causal_code,
                HEADS_FIRST=heads_first, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4,
                maxnreg=MAXNREG)


def dq_grid(n_q: int, batch_heads: int) -> tuple[int, int]:
    """Programs of 2·DQ_BLOCK_M query rows of each batch and head, as `grid` (a causal mask's
    longest tiles are the last rows: the kernel walks them from the end)."""
    return (-(-n_q // (2 * DQ_BLOCK_M)), batch_heads)


def row_layout():
    """Shared layout of a [1, BM] box of fp32 row statistics (one row: no swizzle)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def describe(t: torch.Tensor, shape: list, strides: list, box: list):
    """The kernel's descriptors: [1, 1, rows, D] boxes of the 4-D tensors (codegen.hopper), and
    [1, BM] boxes of the fp32 row statistics viewed as [B·H, Nq]."""
    if len(box) == 2:
        return TensorDescriptor(t, shape, strides, box, row_layout())
    return hopper.describe(t, shape, strides, box)


if gluon is not None:

    @gluon.jit
    def _keys(H, GROUP, BK: gl.constexpr, HEADS_FIRST: gl.constexpr):
        """This program's batch, K/V head and first key (see gpu._order for the order)."""
        Hk = H // GROUP
        if HEADS_FIRST:
            bhk = gl.program_id(0)
            n0 = gl.program_id(1) * (2 * BK)
        else:
            bhk = gl.program_id(1)
            n0 = gl.program_id(0) * (2 * BK)
        return bhk // Hk, bhk % Hk, n0

    @gluon.jit
    def _runs(n0, n_q, offset, BM: gl.constexpr, BK: gl.constexpr, CAUSAL: gl.constexpr):
        """Query row starts of this program's three runs: [lo, m_full) masked (the diagonal),
        [m_full, m_even) whole, [max(m_full, m_even), n_q) masked (the ragged end)."""
        lo = n0 * 0
        m_full = n0 * 0
        if CAUSAL:
            lo = gl.maximum(n0 - offset, 0) // BM * BM
            m_full = gl.cdiv(gl.maximum(n0 + 2 * BK - 1 - offset, 0), BM) * BM
        m_even = n_q // BM * BM
        return lo, m_full, m_even

    @gluon.jit
    def _producer(a, BM: gl.constexpr, BK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        (q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, dk_ptr, dv_ptr, k_smem, v_smem, q_smem, do_smem,
         lse_smem, delta_smem, kv_bar, ready, empty, H, GROUP, n_q, n_k, offset, qk_scale, sm_scale,
         s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn) = a
        b, hk, n0 = _keys(H, GROUP, BK, HEADS_FIRST)
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
        for i in gl.static_range(2):
            _tma_load(k_desc, [b, hk, n0 + i * BK, 0], kv_bar, k_smem.index(i))
            _tma_load(v_desc, [b, hk, n0 + i * BK, 0], kv_bar, v_smem.index(i))
        lo, m_full, m_even = _runs(n0, n_q, offset, BM, BK, CAUSAL)
        n_m = gl.cdiv(gl.maximum(n_q - lo, 0), BM)
        nbytes: gl.constexpr = (q_desc.block_type.nbytes + do_desc.block_type.nbytes
                                + lse_desc.block_type.nbytes + delta_desc.block_type.nbytes)
        for j in range(GROUP * n_m):
            h = hk * GROUP + j // n_m
            m0 = lo + (j % n_m) * BM
            st = j % STAGES
            mbarrier.wait(empty.index(st), ((j // STAGES) & 1) ^ 1)  # a stage starts free
            mbarrier.expect(ready.index(st), nbytes)
            _tma_load(q_desc, [b, h, m0, 0], ready.index(st), q_smem.index(st))
            _tma_load(do_desc, [b, h, m0, 0], ready.index(st), do_smem.index(st))
            _tma_load(lse_desc, [b * H + h, m0], ready.index(st), lse_smem.index(st))
            _tma_load(delta_desc, [b * H + h, m0], ready.index(st), delta_smem.index(st))

    @gluon.jit
    def _step(k_w, v_w, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, g, n0w, m0, n_q, offset,
              qk_scale, MASK: gl.constexpr, CAUSAL: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, op_layout: gl.constexpr):
        """One query block (ring position g) into this warpgroup's dK, dV."""
        st = g % STAGES
        mbarrier.wait(ready.index(st), (g // STAGES) & 1)
        q = q_smem.index(st).reshape([BM, D])
        do = do_smem.index(st).reshape([BM, D])
        # The products start from the row terms, so that no registers hold them while the
        # products run (with them held, ptxas spilled 164-352 bytes a thread at D=128): the
        # accumulators are Sᵀ - lse/scale and dPᵀ - Δ, each row ([1, BM] in shared memory) spread
        # down the tile's columns. Then Pᵀ = exp2(c·acc), c = scale·log2(e), and dSᵀ = Pᵀ∘acc.
        lse = lse_smem.index(st).load(s_layout) * (-1.4426950408889634 / qk_scale)
        s_tok = warpgroup_mma(k_w, q.permute((1, 0)), gl.zeros([BK, BM], gl.float32, s_layout) + lse,
                              is_async=True)
        delta = delta_smem.index(st).load(s_layout)
        dp_tok = warpgroup_mma(v_w, do.permute((1, 0)), gl.zeros([BK, BM], gl.float32, s_layout) - delta,
                               is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        if MASK:
            keys = n0w + gl.arange(0, BK, layout=gl.SliceLayout(1, s_layout))
            rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, s_layout))
            ok = gl.expand_dims(rows < n_q, 0)
            if CAUSAL:
                ok = ok & (gl.expand_dims(keys, 1) <= gl.expand_dims(rows + offset, 0))
            s = gl.where(ok, s, float("-inf"))
        p = gl.exp2(s * qk_scale)  # Pᵀ, keys down
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = p * dp  # dSᵀ in natural units; the scale multiplies dK once
        p_op = gl.convert_layout(p.to(q.dtype), op_layout)
        ds_op = gl.convert_layout(ds.to(q.dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
        dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
        dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
        mbarrier.arrive(empty.index(st), count=1)
        return dk, dv

    @gluon.jit
    def _consumer(a, WG: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, D: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        (q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, dk_ptr, dv_ptr, k_smem, v_smem, q_smem, do_smem,
         lse_smem, delta_smem, kv_bar, ready, empty, H, GROUP, n_q, n_k, offset, qk_scale, sm_scale,
         s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn) = a
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BM, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        b, hk, n0 = _keys(H, GROUP, BK, HEADS_FIRST)
        n0w = n0 + WG * BK
        k_w = k_smem.index(WG).reshape([BK, D])
        v_w = v_smem.index(WG).reshape([BK, D])
        dk = gl.zeros([BK, D], gl.float32, acc_layout)
        dv = gl.zeros([BK, D], gl.float32, acc_layout)
        lo, m_full, m_even = _runs(n0, n_q, offset, BM, BK, CAUSAL)
        diag_hi = gl.minimum(m_full, n_q)
        tail = gl.maximum(m_full, m_even)
        mbarrier.wait(kv_bar, 0)
        g = 0
        for _h in range(GROUP):
            for m0 in range(lo, diag_hi, BM):
                dk, dv = _step(k_w, v_w, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, g, n0w, m0,
                               n_q, offset, qk_scale, True, CAUSAL, BM, BK, D, STAGES, s_layout, op_layout)
                g += 1
            for m0 in range(m_full, m_even, BM):
                dk, dv = _step(k_w, v_w, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, g, n0w, m0,
                               n_q, offset, qk_scale, False, CAUSAL, BM, BK, D, STAGES, s_layout, op_layout)
                g += 1
            for m0 in range(tail, n_q, BM):
                dk, dv = _step(k_w, v_w, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, g, n0w, m0,
                               n_q, offset, qk_scale, True, CAUSAL, BM, BK, D, STAGES, s_layout, op_layout)
                g += 1
        keys = n0w + gl.arange(0, BK, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        ok = gl.expand_dims(keys < n_k, 1)
        kk = gl.expand_dims(keys, 1)
        cc = gl.expand_dims(cols, 0)
        gl.store(dk_ptr + b * s_dkb + hk * s_dkh + kk * s_dkn + cc, (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                 mask=ok)
        gl.store(dv_ptr + b * s_dvb + hk * s_dvh + kk * s_dvn + cc, dv.to(dv_ptr.dtype.element_ty), mask=ok)

    @gluon.jit
    def _consumer0(a, BM: gl.constexpr, BK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        _consumer(a, 0, BM, BK, D, STAGES, CAUSAL, HEADS_FIRST)

    @gluon.jit
    def _consumer1(a, BM: gl.constexpr, BK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        _consumer(a, 1, BM, BK, D, STAGES, CAUSAL, HEADS_FIRST)

    @gluon.jit
    def attn_bwd_dkdv(QDesc, KDesc, VDesc, dODesc, LseDesc, DeltaDesc, dK, dV,
                      s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, H, GROUP, N_Q, N_K, qk_scale, sm_scale,
                      BM: gl.constexpr, BK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                      CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        offset = N_K - N_Q if CAUSAL == 2 else 0  # bottom right: row r sees keys up to r + Nk - Nq
        k_smem = gl.allocate_shared_memory(KDesc.dtype, [2, 1, 1, BK, D], KDesc.layout)
        v_smem = gl.allocate_shared_memory(VDesc.dtype, [2, 1, 1, BK, D], VDesc.layout)
        q_smem = gl.allocate_shared_memory(QDesc.dtype, [STAGES, 1, 1, BM, D], QDesc.layout)
        do_smem = gl.allocate_shared_memory(dODesc.dtype, [STAGES, 1, 1, BM, D], dODesc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BM], LseDesc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BM], DeltaDesc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release it
        fence_async_shared()
        a = (QDesc, KDesc, VDesc, dODesc, LseDesc, DeltaDesc, dK, dV, k_smem, v_smem, q_smem, do_smem, lse_smem,
             delta_smem, kv_bar, ready, empty, H, GROUP, N_Q, N_K, offset, qk_scale, sm_scale,
             s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn)
        gl.warp_specialize([(_consumer0, (a, BM, BK, D, STAGES, CAUSAL, HEADS_FIRST)),
                            (_consumer1, (a, BM, BK, D, STAGES, CAUSAL, HEADS_FIRST)),
                            (_producer, (a, BM, BK, D, STAGES, CAUSAL, HEADS_FIRST))],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    # ---- dQ and Δ ---------------------------------------------------------------------------

    @gluon.jit
    def _dq_tile(H, BM: gl.constexpr, CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        """This program's batch, head and first query row (causal: the longest tiles first; see
        gpu._order for the order)."""
        if HEADS_FIRST:
            bh = gl.program_id(0)
            t = gl.program_id(1)
            tiles = gl.num_programs(1)
        else:
            bh = gl.program_id(1)
            t = gl.program_id(0)
            tiles = gl.num_programs(0)
        if CAUSAL:
            t = tiles - 1 - t
        return bh // H, bh % H, t * (2 * BM)

    @gluon.jit
    def _dq_blocks(r0, rows, n_q, n_k, offset, BN: gl.constexpr, CAUSAL: gl.constexpr):
        """(whole, seen): key blocks every one of rows r0 .. r0+rows-1 sees whole, and key blocks
        any of them sees. Rows at or past n_q see none."""
        seen = gl.cdiv(n_k, BN)
        whole = n_k // BN
        if CAUSAL:
            seen = gl.minimum(seen, gl.cdiv(gl.maximum(r0 + rows + offset, 0), BN))
            whole = gl.minimum(whole, gl.maximum(r0 + offset + 1, 0) // BN)
        seen = gl.where(r0 < n_q, seen, 0)
        return gl.minimum(whole, seen), seen

    @gluon.jit
    def _dq_producer(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                     CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        (q_desc, k_desc, v_desc, do_desc, out_ptr, lse_ptr, delta_ptr, dq_ptr, q_smem, do_smem, k_smem, v_smem,
         q_bar, ready, empty, H, GROUP, n_q, n_k, offset, qk_scale, sm_scale, s_ob, s_oh, s_om, s_dqb, s_dqh,
         s_dqm) = a
        b, h, m0 = _dq_tile(H, BM, CAUSAL, HEADS_FIRST)
        hk = h // GROUP
        for i in gl.static_range(2):
            mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            _tma_load(q_desc, [b, h, m0 + i * BM, 0], q_bar.index(i), q_smem.index(i))
            _tma_load(do_desc, [b, h, m0 + i * BM, 0], q_bar.index(i), do_smem.index(i))
        _, n_blocks = _dq_blocks(m0, 2 * BM, n_q, n_k, offset, BN, CAUSAL)
        nbytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
        for j in range(n_blocks):
            st = j % STAGES
            mbarrier.wait(empty.index(st), ((j // STAGES) & 1) ^ 1)  # a stage starts free
            mbarrier.expect(ready.index(st), nbytes)
            _tma_load(k_desc, [b, hk, j * BN, 0], ready.index(st), k_smem.index(st))
            _tma_load(v_desc, [b, hk, j * BN, 0], ready.index(st), v_smem.index(st))

    @gluon.jit
    def _dq_step(q, do, k_smem, v_smem, ready, empty, dq, lse_term, delta, j, r0, n_k, offset, qk_scale,
                 MASK: gl.constexpr, CAUSAL: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                 STAGES: gl.constexpr, s_layout: gl.constexpr, op_layout: gl.constexpr):
        """Key block j into this warpgroup's dQ."""
        st = j % STAGES
        mbarrier.wait(ready.index(st), (j // STAGES) & 1)
        k = k_smem.index(st).reshape([BN, D])
        v = v_smem.index(st).reshape([BN, D])
        # S - lse/scale and dP - Δ: the row terms start the accumulators, as in _step
        s_tok = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout) + lse_term,
                              is_async=True)
        dp_tok = warpgroup_mma(do, v.permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout) - delta,
                               is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        if MASK:
            rows = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
            keys = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            s = _masked(s, rows, keys, n_k, offset, CAUSAL)
        p = gl.exp2(s * qk_scale)
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds_op = gl.convert_layout((p * dp).to(q.dtype), op_layout)
        dq_tok = warpgroup_mma(ds_op, k, dq, is_async=True)
        dq, _ = warpgroup_mma_wait(0, deps=[dq_tok, ds_op])
        mbarrier.arrive(empty.index(st), count=1)
        return dq

    @gluon.jit
    def _dq_consumer(a, WG: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        (q_desc, k_desc, v_desc, do_desc, out_ptr, lse_ptr, delta_ptr, dq_ptr, q_smem, do_smem, k_smem, v_smem,
         q_bar, ready, empty, H, GROUP, n_q, n_k, offset, qk_scale, sm_scale, s_ob, s_oh, s_om, s_dqb, s_dqh,
         s_dqm) = a
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row_io: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        b, h, m0 = _dq_tile(H, BM, CAUSAL, HEADS_FIRST)
        bh = b * H + h
        r0 = m0 + WG * BM
        _, n_blocks = _dq_blocks(m0, 2 * BM, n_q, n_k, offset, BN, CAUSAL)
        whole, seen = _dq_blocks(r0, BM, n_q, n_k, offset, BN, CAUSAL)
        mbarrier.wait(q_bar.index(WG), 0)
        q = q_smem.index(WG).reshape([BM, D])
        do = do_smem.index(WG).reshape([BM, D])
        # Δ = rowsum(dO ∘ O) in fp32, stored for the dK/dV kernel, which runs next
        rows_io = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, row_io))
        cols_io = gl.arange(0, D, layout=gl.SliceLayout(0, row_io))
        ok_io = gl.expand_dims(rows_io < n_q, 1)
        o = gl.load(out_ptr + b * s_ob + h * s_oh + gl.expand_dims(rows_io, 1) * s_om + gl.expand_dims(cols_io, 0),
                    mask=ok_io, other=0.0)
        delta_rows = gl.sum(o.to(gl.float32) * do.load(row_io).to(gl.float32), 1)
        gl.store(delta_ptr + bh * n_q + rows_io, delta_rows, mask=rows_io < n_q)
        delta = gl.expand_dims(gl.convert_layout(delta_rows, gl.SliceLayout(1, s_layout)), 1)
        rows = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        lse = gl.load(lse_ptr + bh * n_q + rows, mask=rows < n_q, other=0.0)
        lse_term = gl.expand_dims(lse * (-1.4426950408889634 / qk_scale), 1)
        dq = gl.zeros([BM, D], gl.float32, acc_layout)
        for j in range(0, whole):
            dq = _dq_step(q, do, k_smem, v_smem, ready, empty, dq, lse_term, delta, j, r0, n_k, offset, qk_scale,
                          False, CAUSAL, BM, BN, D, STAGES, s_layout, op_layout)
        for j in range(whole, seen):
            dq = _dq_step(q, do, k_smem, v_smem, ready, empty, dq, lse_term, delta, j, r0, n_k, offset, qk_scale,
                          True, CAUSAL, BM, BN, D, STAGES, s_layout, op_layout)
        for j in range(seen, n_blocks):  # blocks only the other warpgroup's rows see
            st = j % STAGES
            mbarrier.wait(ready.index(st), (j // STAGES) & 1)  # not before it is filled: see below
            mbarrier.arrive(empty.index(st), count=1)
        # (a stage's "empty" barrier counts one arrival from each consumer a filling: arriving
        # before the stage was filled could complete a later filling's count on its own)
        rows_o = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
        cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        gl.store(dq_ptr + b * s_dqb + h * s_dqh + gl.expand_dims(rows_o, 1) * s_dqm + gl.expand_dims(cols_o, 0),
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=gl.expand_dims(rows_o < n_q, 1))

    @gluon.jit
    def _dq_consumer0(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                      CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        _dq_consumer(a, 0, BM, BN, D, STAGES, CAUSAL, HEADS_FIRST)

    @gluon.jit
    def _dq_consumer1(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                      CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr):
        _dq_consumer(a, 1, BM, BN, D, STAGES, CAUSAL, HEADS_FIRST)

    @gluon.jit
    def attn_bwd_dq(QDesc, KDesc, VDesc, dODesc, Out, Lse, Delta, dQ, s_ob, s_oh, s_om, s_dqb, s_dqh, s_dqm,
                    H, GROUP, N_Q, N_K, qk_scale, sm_scale,
                    BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                    CAUSAL: gl.constexpr, HEADS_FIRST: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        offset = N_K - N_Q if CAUSAL == 2 else 0
        q_smem = gl.allocate_shared_memory(QDesc.dtype, [2, 1, 1, BM, D], QDesc.layout)
        do_smem = gl.allocate_shared_memory(dODesc.dtype, [2, 1, 1, BM, D], dODesc.layout)
        k_smem = gl.allocate_shared_memory(KDesc.dtype, [STAGES, 1, 1, BN, D], KDesc.layout)
        v_smem = gl.allocate_shared_memory(VDesc.dtype, [STAGES, 1, 1, BN, D], VDesc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release it
        fence_async_shared()
        a = (QDesc, KDesc, VDesc, dODesc, Out, Lse, Delta, dQ, q_smem, do_smem, k_smem, v_smem, q_bar, ready, empty,
             H, GROUP, N_Q, N_K, offset, qk_scale, sm_scale, s_ob, s_oh, s_om, s_dqb, s_dqh, s_dqm)
        gl.warp_specialize([(_dq_consumer0, (a, BM, BN, D, STAGES, CAUSAL, HEADS_FIRST)),
                            (_dq_consumer1, (a, BM, BN, D, STAGES, CAUSAL, HEADS_FIRST)),
                            (_dq_producer, (a, BM, BN, D, STAGES, CAUSAL, HEADS_FIRST))],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
