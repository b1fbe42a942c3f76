"""The forward on Hopper (sm_90), written in Gluon: warp-specialized, FlashAttention 3's way.

    attn_fwd   O = softmax(scale · Q Kᵀ [causal]) V and the log-sum-exp     grid (SMs,)

The programs are persistent: one per SM, each walking its share of the tiles (`schedule`). A
tile is 2·BM query rows of one head, and a program takes tiles in pairs, tile m with tile
Nq/2BM−1−m of the same head, so that under a causal mask every pair holds the same number of key
blocks and a static round-robin split of the pairs is balanced. A program has three partitions:

- a producer warp streams K and V blocks into a ring of STAGES shared-memory stages through
  tensor descriptors (TMA), each stage's K and V with their own "ready" and "empty" barriers.
  The ring and its barriers' phases run on from one tile into the next, so the next tile's first
  blocks load while the current one finishes;
- two consumer warpgroups each own BM of a tile's rows. Block j's Q·Kᵀ is issued, then block
  j−1's P·V, and the softmax of block j runs while P·V is still on the tensor cores (the overlap
  inside a warpgroup). A consumer frees a stage's K as soon as its Q·Kᵀ is done and its V after
  P·V; the stage's "empty" barrier counts both consumers, and neither waits for the other. It
  frees its Q after the tile's last Q·Kᵀ, so the next tile's Q loads during the last P·V and the
  epilogue, and writes O through a buffer of its own.

Triton's own pipeliner cannot order the products this way (it waits for a product right after
issuing it unless the result crosses an iteration; docs/benchmarks.md, "Tried and not
landed"), and its automatic warp specialization did not apply to these loops under Triton 3.6.

The programs it covers are the common ones: a positive scale, optionally a causal mask (top
left, or bottom right with at least as many keys as queries, so that every row sees a key), no
other score ops, no operands, no dropout; 16-bit inputs, head dim 128 (or 64 under a causal
mask on at least 4096 queries and a small grid, where it was measured faster), tensors the copy
engine can read. Everything else takes the generated Triton forward (`supports` says why). Row
statistics are saved as the generated forward saves them for such programs: one plane, the
log-sum-exp in natural-log units (ScoreProgram.stats_planes).

Key blocks come in two loops per consumer: blocks all of its rows see whole, then the rest (the
causal diagonal, the ragged end of Nk) under the masks. Block 0 always takes the masks.
"""

from __future__ import annotations

import torch

from flashfx.ir import ScoreProgram

try:  # Gluon: Triton ≥ 3.5. Without it this forward is never chosen.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None
else:  # the copy engine's loads and stores were renamed after Triton 3.6 (the old names now raise)
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    _tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

# The measured configuration (H200, docs/benchmarks.md, "The warp-specialized forward"):
# tiles of 2 x 64 query rows, 128-key blocks, 2 stages (64 KB each at D=128), consumers at 240
# registers a thread and the producer at 24, under a kernel limit of 168 (12 warps x 32 x 168
# fills the register file).
BLOCK_M = 64  # rows per consumer warpgroup; a program holds two
BLOCK_N = 128
STAGES = 2
CONSUMER_REGS = 240
PRODUCER_REGS = 24
MAXNREG = 168
HEAD_DIMS = (64, 128)
# At head dim 64 it beat the generated forward only under a causal mask, on at least 4096 queries
# and on small grids (GPT-2's layer at 4096: 2.9 pairs of query tiles an SM, 1.11x). Without a
# mask it was 0.79-1.00x of it, at 1024 queries 0.81-0.96x, and under a causal mask at 15.5 pairs
# an SM 0.97-1.01x (docs/benchmarks.md, "Persistent, pairs of query tiles").
D64_MIN_QUERIES = 4096
D64_MAX_PAIRS_PER_SM = 4


def supports(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
             n_k: int, batch_heads: int) -> str | None:
    """None when this forward computes the call; else why not, in words. (Whether the tensors'
    layout lets the copy engine read them is the launch's to check.)"""
    why = covers(program, dtype, device, head_dim, n_q, n_k)
    if why is None and head_dim == 64:
        return d64_rule(program, n_q, batch_heads, torch.cuda.get_device_properties(device).multi_processor_count)
    return why


def covers(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
           n_k: int) -> str | None:
    """None when the Gluon kernels here and in codegen.hopper_bwd compute such a call; else why
    not. The forward adds its head-dim-64 rule (`supports`)."""
    if gluon is None:
        return "this Triton has no Gluon"
    if dtype not in (torch.float16, torch.bfloat16):
        return "inputs are not fp16/bf16"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim}, measured at {', '.join(map(str, HEAD_DIMS))} only"
    ops = program.ops
    if len(ops) != 1 or ops[0].name != "scale" or not ops[0].const > 0 or program.dropout:
        return "score program is more than a positive scale and a causal mask"
    if program.causal == "bottom_right" and n_k < n_q:
        return "bottom-right causal mask with fewer keys than queries (rows that see no key)"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "not an sm_90 GPU"
    return None


def d64_rule(program: ScoreProgram, n_q: int, batch_heads: int, sm_count: int) -> str | None:
    """At head dim 64, None where this forward was measured faster than the generated one; else
    why not."""
    if not program.causal or n_q < D64_MIN_QUERIES:
        return f"head dim 64 without a causal mask or with fewer than {D64_MIN_QUERIES} queries"
    _, (items, _, _) = schedule(batch_heads, n_q, sm_count)
    if items > D64_MAX_PAIRS_PER_SM * sm_count:
        return (f"head dim 64 with {items / sm_count:.1f} pairs of query tiles an SM (the generated forward "
                f"is faster above {D64_MAX_PAIRS_PER_SM})")
    return None


def schedule(batch_heads: int, n_q: int, sm_count: int) -> tuple[int, tuple[int, int, int]]:
    """(programs, (items, pairs a head, query tiles a head)): the persistent grid and the integers
    the kernel walks it by. An item is a pair of one head's query tiles; the programs take items
    round-robin, one program an SM (every register of it; 197 KB of shared memory at D=128)."""
    tiles = -(-n_q // (2 * BLOCK_M))
    pairs = -(-tiles // 2)
    items = pairs * batch_heads
    return min(items, sm_count), (items, pairs, tiles)


def constexprs(head_dim: int, causal_code: int) -> dict:
    """The kernel's compile-time arguments and launch options for a head dim and causal code
    (0 none, 1 top left, 2 bottom right)."""
    return dict(BM=BLOCK_M, BN=BLOCK_N, D=head_dim, STAGES=STAGES, CAUSAL=causal_code, CONSUMER_REGS=CONSUMER_REGS,
                PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)


def describe(t: torch.Tensor, shape: list, strides: list, box: list):
    """A Gluon tensor descriptor reading [1, 1, rows, D] boxes of the 4-D view t."""
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(t, shape, strides, box, layout)


if gluon is not None:

    @gluon.jit
    def _masked(s, rows, cols, n_k, offset, CAUSAL: gl.constexpr):
        ok = gl.expand_dims(cols < n_k, 0)
        if CAUSAL:
            ok = ok & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + offset, 1))
        return gl.where(ok, s, float("-inf"))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale, r0, n0, n_k, offset, MASK: gl.constexpr, CAUSAL: gl.constexpr,
                      BM: gl.constexpr, BN: gl.constexpr, s_layout: gl.constexpr):
        """Block scores s (raw) -> probabilities (log2 units, scale folded), new max and sum.
        Every row has seen a key by the end of block 0, so m_i is finite after it."""
        if MASK:
            rows = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            s = _masked(s, rows, cols, n_k, offset, CAUSAL)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _tile(t, n_pairs, n_mt, BM: gl.constexpr):
        """This program's t-th tile slot: (query row start, batch·head index, whether the tile exists).
        Slots 2i and 2i+1 are the two tiles of the program's i-th item (a pair of query tiles)."""
        it = gl.program_id(0) + (t // 2) * gl.num_programs(0)
        side = t % 2
        p = it % n_pairs
        bh = it // n_pairs
        far = n_mt - 1 - p
        m = gl.where(side == 0, far, p)
        ok = (side == 0) | (p != far)
        return m * (2 * BM), bh, ok

    @gluon.jit
    def _n_slots(n_items):
        return 2 * gl.cdiv(n_items - gl.program_id(0), gl.num_programs(0))

    @gluon.jit
    def _n_blocks(m0, n_k, offset, BM: gl.constexpr, BN: gl.constexpr, CAUSAL: gl.constexpr):
        n = gl.cdiv(n_k, BN)
        if CAUSAL:
            n = gl.minimum(n, gl.cdiv(m0 + 2 * BM + offset, BN))
        return n

    @gluon.jit
    def _producer(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr):
        (q_desc, k_desc, v_desc, o_desc, stats, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
         k_empty, v_empty, H, GROUP, n_items, n_pairs, n_mt, n_q, n_k, offset, qk_scale) = a
        g = 0  # key blocks streamed so far: the ring's position
        c = 0  # tiles so far: the parity of Q's barriers
        for t in range(_n_slots(n_items)):
            m0, bh, ok = _tile(t, n_pairs, n_mt, BM)
            if ok:
                b = bh // H
                h = bh % H
                hk = h // GROUP
                for i in gl.static_range(2):
                    mbarrier.wait(q_empty.index(i), (c & 1) ^ 1)
                    mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes)
                    _tma_load(q_desc, [b, h, m0 + i * BM, 0], q_bar.index(i), q_smem.index(i))
                n_blocks = _n_blocks(m0, n_k, offset, BM, BN, CAUSAL)
                for j in range(n_blocks):
                    s = g % STAGES
                    phase = (g // STAGES) & 1
                    # a stage starts free: its empty barrier's phase 1 counts as complete
                    mbarrier.wait(k_empty.index(s), phase ^ 1)
                    mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                    _tma_load(k_desc, [b, hk, j * BN, 0], k_ready.index(s), k_smem.index(s))
                    mbarrier.wait(v_empty.index(s), phase ^ 1)
                    mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                    _tma_load(v_desc, [b, hk, j * BN, 0], v_ready.index(s), v_smem.index(s))
                    g += 1
                c += 1

    @gluon.jit
    def _consume(q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc, p_prev, m_i, l_i, qk_scale, r0, j, g,
                 n_k, offset, MASK: gl.constexpr, CAUSAL: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                 D: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                 p_layout: gl.constexpr):
        """Block j (ring position g) scores and softmax while block j-1's P·V runs."""
        st = g % STAGES
        mbarrier.wait(k_ready.index(st), (g // STAGES) & 1)
        kt = k_smem.index(st).reshape([BN, D]).permute((1, 0))
        s_tok = warpgroup_mma(q2, kt, gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        prev = (g - 1) % STAGES
        mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_prev, v_smem.index(prev).reshape([BN, D]), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # products finish in order: Q·Kᵀ of block j is done
        mbarrier.arrive(k_empty.index(st), count=1)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, r0, j * BN, n_k, offset, MASK, CAUSAL, BM, BN,
                                           s_layout)
        acc, _ = warpgroup_mma_wait(0, deps=[o_tok, p_prev])
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_next = gl.convert_layout(p.to(q2.dtype), p_layout)
        return acc, p_next, m_i, l_i

    @gluon.jit
    def _consumer(a, WG: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr):
        (q_desc, k_desc, v_desc, o_desc, stats, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
         k_empty, v_empty, H, GROUP, n_items, n_pairs, n_mt, n_q, n_k, offset, qk_scale) = a
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_view = q_smem.index(WG)
        q2 = q_view.reshape([BM, D])
        o_view = o_smem.index(WG)
        g = 0
        c = 0
        for t in range(_n_slots(n_items)):
            m0, bh, ok = _tile(t, n_pairs, n_mt, BM)
            if ok:
                b = bh // H
                h = bh % H
                n_blocks = _n_blocks(m0, n_k, offset, BM, BN, CAUSAL)
                r0 = m0 + WG * BM
                n_full = n_k // BN
                if CAUSAL:
                    n_full = gl.minimum(n_full, (r0 + offset + 1) // BN)
                mbarrier.wait(q_bar.index(WG), c & 1)
                st = g % STAGES
                mbarrier.wait(k_ready.index(st), (g // STAGES) & 1)
                s = warpgroup_mma(q2, k_smem.index(st).reshape([BN, D]).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False)
                mbarrier.arrive(k_empty.index(st), count=1)
                m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
                l_i = gl.full([BM], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
                p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, r0, 0, n_k, offset, True, CAUSAL, BM,
                                                   BN, s_layout)
                p_prev = gl.convert_layout(p.to(q2.dtype), p_layout)
                acc = gl.zeros([BM, D], gl.float32, o_layout)
                for j in range(1, n_full):
                    acc, p_prev, m_i, l_i = _consume(q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc,
                                                     p_prev, m_i, l_i, qk_scale, r0, j, g + j, n_k, offset, False,
                                                     CAUSAL, BM, BN, D, STAGES, s_layout, o_layout, p_layout)
                for j in range(gl.maximum(n_full, 1), n_blocks):
                    acc, p_prev, m_i, l_i = _consume(q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc,
                                                     p_prev, m_i, l_i, qk_scale, r0, j, g + j, n_k, offset, True,
                                                     CAUSAL, BM, BN, D, STAGES, s_layout, o_layout, p_layout)
                mbarrier.arrive(q_empty.index(WG), count=1)  # every Q·Kᵀ of this tile is done
                last = g + n_blocks - 1
                mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
                acc = warpgroup_mma(p_prev, v_smem.index(last % STAGES).reshape([BN, D]), acc)
                mbarrier.arrive(v_empty.index(last % STAGES), count=1)
                l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                o = acc / gl.expand_dims(l_o, 1)
                tma.store_wait(0)  # the previous tile's O has left the buffer
                o_view.reshape([BM, D]).store(o.to(q2.dtype))
                fence_async_shared()
                _tma_store(o_desc, [b, h, r0, 0], o_view)
                rows = r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
                lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # log2 units to natural: times ln 2
                gl.store(stats + bh * n_q + rows, lse, mask=rows < n_q)
                g += n_blocks
                c += 1
        tma.store_wait(0)

    @gluon.jit
    def _consumer0(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr):
        _consumer(a, 0, BM, BN, D, STAGES, CAUSAL)

    @gluon.jit
    def _consumer1(a, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr):
        _consumer(a, 1, BM, BN, D, STAGES, CAUSAL)

    @gluon.jit
    def attn_fwd(QDesc, KDesc, VDesc, ODesc, Stats, H, GROUP, N_ITEMS, N_PAIRS, N_MT, N_Q, N_K, qk_scale,
                   BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        offset = N_K - N_Q if CAUSAL == 2 else 0  # bottom right: row r sees keys up to r + Nk - Nq
        q_smem = gl.allocate_shared_memory(QDesc.dtype, [2, 1, 1, BM, D], QDesc.layout)
        o_smem = gl.allocate_shared_memory(ODesc.dtype, [2, 1, 1, BM, D], ODesc.layout)
        k_smem = gl.allocate_shared_memory(KDesc.dtype, [STAGES, 1, 1, BN, D], KDesc.layout)
        v_smem = gl.allocate_shared_memory(VDesc.dtype, [STAGES, 1, 1, BN, D], VDesc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers release it
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        a = (QDesc, KDesc, VDesc, ODesc, Stats, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
             k_empty, v_empty, H, GROUP, N_ITEMS, N_PAIRS, N_MT, N_Q, N_K, offset, qk_scale)
        gl.warp_specialize([(_consumer0, (a, BM, BN, D, STAGES, CAUSAL)),
                            (_consumer1, (a, BM, BN, D, STAGES, CAUSAL)),
                            (_producer, (a, BM, BN, D, STAGES, CAUSAL))],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
