"""Attention with few queries and a long key range (decoding with a KV cache), on one GPU.

    PYTHONPATH=. python3 benchmarks/decode.py            # the shapes below, bf16
    PYTHONPATH=. python3 benchmarks/decode.py --tiny     # CPU smoke run (Triton interpreter)

Here one query block per batch·head leaves most SMs idle, and the forward splits its key range
into parts (plan.kv_splits) merged by a combine kernel; under GQA a tile holds the query heads
of a group together (gpu.packs), so each K/V block is read once per group. This times, per
shape, flashfx's op as planned, flashfx forced unsplit, flashfx with one query head per tile
(GQA shapes), and SDPA (PyTorch's own choice of backend, GQA through enable_gqa). Decoding reads each K/V byte once: GB/s is
K and V bytes over the time. Times are GPU times of CUDA-graph replays
(triton.testing.do_bench_cudagraph), which leave out the host's launch cost: a decoding loop
is host-bound unless it replays graphs (torch.compile mode="reduce-overhead"). Every result is
checked against fp32 math attention. Writes decode.json and decode.png under $OUT (else
benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import plots  # noqa: E402
from flashfx.ir import ScoreOp, ScoreProgram  # noqa: E402
from flashfx.runtime import gpu  # noqa: E402

# (B, H, Hk, Nq, Nk, D): single-token decoding with GQA and MHA, and a short chunk of queries
SHAPES = [(1, 32, 8, 1, 4096, 128), (1, 32, 8, 1, 32768, 128), (8, 32, 8, 1, 8192, 128),
          (4, 16, 16, 1, 16384, 64), (2, 32, 8, 16, 16384, 128)]
TINY = [(1, 2, 1, 1, 300, 16), (1, 2, 2, 3, 200, 32), (1, 4, 2, 3, 200, 32)]


def program(D: int, nq: int) -> ScoreProgram:
    # a chunk of new queries sees every cached key and the new ones up to itself: bottom-right
    return ScoreProgram((ScoreOp("scale", None, D ** -0.5),), "bottom_right" if nq > 1 else None)


def reference(q, k, v, prog) -> torch.Tensor:
    G = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(G, dim=1) for x in (k, v))
    s = q.float() @ k.transpose(-2, -1) * prog.ops[0].const
    if prog.causal == "bottom_right":
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(nk - nq + 1), float("-inf"))
    return torch.softmax(s, -1) @ v


def variants(q, k, v, prog, planned_parts=None):
    def flashfx(parts, pack=None):
        def run():
            saved = gpu.FWD_SPLITS, gpu.GQA_PACK
            gpu.FWD_SPLITS, gpu.GQA_PACK = parts, pack
            try:
                return gpu.forward(q, k, v, [], prog)[0]
            finally:
                gpu.FWD_SPLITS, gpu.GQA_PACK = saved
        return run

    out = {"flashfx": flashfx(planned_parts), "flashfx unsplit": flashfx(1)}
    if q.shape[1] != k.shape[1]:
        out["flashfx head per tile"] = flashfx(planned_parts, pack=False)
    if q.is_cuda:
        mask = None
        if prog.causal == "bottom_right":  # SDPA's is_causal is top-left: pass the mask itself
            nq, nk = q.shape[-2], k.shape[-2]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        gqa = q.shape[1] != k.shape[1]
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out


def measure(shape, dtype, device, timer, force_parts=None) -> list[dict]:
    B, H, Hk, Nq, Nk, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, Nq, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hk, Nk, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    prog = program(D, Nq)
    ref = reference(q, k, v, prog)
    kv_bytes = 2 * k.numel() * k.element_size()
    plan = gpu.tile_plan(q, k, prog)
    bm, G = plan.fwd.block_m, H // Hk

    def parts_of(pack: bool) -> int:
        programs = -(-G * Nq // bm) * B * Hk if pack else -(-Nq // bm) * B * H
        return force_parts or gpu.forward_splits(programs, Nk, plan.fwd.block_n, q.device)

    parts = {"flashfx": parts_of(gpu.packs(G, Nq, bm)), "flashfx head per tile": parts_of(False)}
    rows = []
    for name, fn in variants(q, k, v, prog, force_parts).items():
        out = fn()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        us = timer(fn) * 1e3
        rows.append(dict(B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=D, variant=name, us=us, gb_s=kv_bytes / us / 1e3,
                         err=err, parts=parts.get(name, 1)))
        print(f"B={B} H={H}/{Hk} Nq={Nq} Nk={Nk} D={D} {name:16s} {us:9.1f} us {kv_bytes / us / 1e3:8.0f} GB/s"
              f"  err {err:.1e}  parts {rows[-1]['parts']}", flush=True)
    return rows


def plot(rows, path, env=None):
    plt = plots.pyplot()
    if plt is None:
        return
    key = lambda r: (r["B"], r["H"], r["Hk"], r["Nq"], r["Nk"], r["D"])  # noqa: E731
    shapes = sorted({key(r) for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    plots.grouped_bars(ax, [f"B{b} H{h}/{hk}\nNq{nq} Nk{nk} D{d}" for b, h, hk, nq, nk, d in shapes],
                       {n: [next((r["gb_s"] for r in rows if r["variant"] == n and key(r) == s), 0) for s in shapes]
                        for n in names})
    plots.save(fig, ax, "K/V GB/s (higher is better)", path, env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1 (times mean nothing)")
    args = p.parse_args(argv)
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("decode --tiny: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        import time

        def timer(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        shapes, dtype, device = TINY, torch.float32, "cpu"
    else:
        if not torch.cuda.is_available():
            print("decode: needs a CUDA GPU (or --tiny)", file=sys.stderr)
            return 2
        import triton

        def timer(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=50)

        shapes, dtype, device = SHAPES, torch.bfloat16, "cuda"
    rows = []
    for shape in shapes:  # the interpreter plans no parts (no SMs): the smoke run forces 2
        rows += measure(shape, dtype, device, timer, force_parts=2 if args.tiny else None)
    bad = [r for r in rows if r["err"] > (1e-4 if dtype == torch.float32 else 2e-2)]
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               torch=torch.__version__, triton=__import__("triton").__version__)
    with open(os.path.join(out_dir, "decode.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    plot(rows, os.path.join(out_dir, "decode.png"), plots.env_line(env["device"], env["torch"], env["triton"]))
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}")
    print("| B | H/Hk | Nq | Nk | D | variant | parts | µs | K/V GB/s | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['H']}/{r['Hk']} | {r['Nq']} | {r['Nk']} | {r['D']} | {r['variant']} | {r['parts']} | "
              f"{r['us']:.1f} | {r['gb_s']:.0f} | {r['err']:.1e} |")
    if bad:
        print(f"WRONG RESULTS: {len(bad)} rows over tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
