"""Registers and spills of the generated kernels on sm_90, from ptxas, without a GPU.

    PYTHONPATH=. python3 benchmarks/sm90_registers.py --precision tf32x3 --out docs/planner_fp32_regs.json

Compiles the forward, dK/dV and dQ kernels of a causal scaled program for sm_90a (Triton's CUDA
backend and the ptxas it ships; no device needed), with tile reads through tensor descriptors as
on Hopper, over a grid of sound tiles (BM, BN in 32/64/128, 4 or 8 warps, 1 or 2 stages) at
head dims 64 and 128, and records ptxas's registers per thread and spill-store bytes. The cost
model's register formulas (flashfx/planner/cost.py) are checked against these counts in
tests/planner/test_cost.py. --precision picks tl.dot's input precision for fp32 inputs ("tf32",
"tf32x3"; "ieee" takes minutes a kernel); --jobs compiles in parallel processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KERNELS = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
PTRS = {"Q", "K", "V", "dOut", "Out", "Stats", "Delta", "dK", "dV", "dQ", "PartO", "PartStats"}


def grid(head_dims=(64, 128)) -> list[tuple]:
    from flashfx.planner import plan

    return [(kern, d, bm, bn, w, s) for d in head_dims for kern in KERNELS for bm in (32, 64, 128)
            for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2) if plan._sound(kern, bm, bn, w)]


def compile_sm90(kernel: str, program: str, head_dim: int, bm: int, bn: int, warps: int, stages: int,
                 precision: str = "tf32", elt: str = "bf16", tma: bool = True, keys_down: bool = False):
    """One generated kernel ("fwd", "dkdv" or "dq" of the encoded `program`) compiled for sm_90a as
    a launch on contiguous `elt` tensors would be: unit head-dim strides, 16-byte aligned
    pointers, tile reads through tensor descriptors when `tma`. Needs Triton's NVIDIA backend and
    a process that is not interpreting (TRITON_INTERPRET unset when Triton was imported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashfx.codegen import attention as codegen
    from flashfx.ir import ScoreProgram

    fn = getattr(codegen.load(program), KERNELS[kernel])
    names = fn.arg_names
    rows = {"QDesc": bm, "dODesc": bm, "KDesc": bn, "VDesc": bn}
    causal = {None: 0, "top_left": 1, "bottom_right": 2}[ScoreProgram.decode(program).causal]
    constexprs = dict(GROUP=1, CAUSAL=causal, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                      PRECISION=precision, TMA=tma, FLAT=False, SPLITS=1, PACK=False,
                      KEYS_DOWN=keys_down, HEADS_FIRST=False)
    constexprs.update({n: 1 for n in names if n.startswith("stride") and n.endswith("d")})  # unit inner strides
    constexprs = {n: v for n, v in constexprs.items() if n in names}
    fp32 = {"Stats", "Delta", "PartO", "PartStats"}
    signature = {n: ("constexpr" if n in constexprs
                     else f"tensordesc<{elt}[1,1,{rows[n]},{head_dim}]>" if n in rows and tma
                     else "*fp32" if n in fp32 else f"*{elt}" if n in PTRS or n in rows else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=warps, num_stages=stages))


def compile_one(job: tuple, precision: str) -> dict:
    """ptxas's registers and spill bytes for one (kernel, head dim, BM, BN, warps, stages), fp32
    inputs, causal scaled program."""
    from flashfx.ir import ScoreOp, ScoreProgram

    kern, d, bm, bn, warps, stages = job
    program = ScoreProgram((ScoreOp("scale", None, d ** -0.5),), "top_left").encode()
    start = time.time()
    try:
        compiled = compile_sm90(kern, program, d, bm, bn, warps, stages, precision, elt="fp32")
    except Exception as e:  # noqa: BLE001 - a config Triton cannot compile is recorded, not fatal
        return dict(error=f"{type(e).__name__}: {str(e)[:160]}")
    return dict(smem=compiled.metadata.shared, **ptxas_counts(compiled), compile_s=round(time.time() - start, 1))


def ptxas_counts(compiled) -> dict:
    """Registers a thread and spill-store bytes of a compiled kernel, from `ptxas -v` on its PTX."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        # the ptxas Triton ships that reads its PTX version (3.9 emits PTX newer than "ptxas")
        for name in ("ptxas", "ptxas-blackwell"):
            if os.path.exists(os.path.join(bindir, name)):
                run = subprocess.run([os.path.join(bindir, name), "-v", "--gpu-name", "sm_90a", path, "-o",
                                      path + ".cubin"], capture_output=True, text=True)
                if run.returncode == 0:
                    out = run.stderr
                    break
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return dict(regs=regs and int(regs.group(1)), spill=spill and int(spill.group(1)))


def _compile_gluon(fn, descs: dict, constexprs: dict, pointers: dict) -> dict:
    """A Gluon kernel compiled for sm_90a with the runtime's launch options: `descs` its tensor
    descriptors by parameter, `pointers` the pointer parameters' types ("*bf16", all 16-byte
    aligned); fp32 scales; every other parameter an i32. Shared memory, registers, spill bytes
    and the register reallocations in its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = fn.arg_names
    constexprs = dict(constexprs)
    options = dict(num_warps=constexprs["num_warps"], maxnreg=constexprs.pop("maxnreg"))
    signature = {n: (mangle_type(descs[n]) if n in descs else pointers[n] if n in pointers
                     else "fp32" if n in ("qk_scale", "sm_scale") else "constexpr" if n in constexprs else "i32")
                 for n in names}
    src = GluonASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]] for n in pointers})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
    return dict(smem=compiled.metadata.shared, setmaxnreg=compiled.asm["ptx"].count("setmaxnreg"),
                **ptxas_counts(compiled))


def _boxes(describe, head_dim: int, **rows) -> dict:
    """Descriptors of a [2, 4, 1024, head_dim] bf16 tensor in [1, 1, rows, head_dim] boxes."""
    import torch

    q = torch.empty((2, 4, 1024, head_dim), dtype=torch.bfloat16)
    return {n: describe(q, list(q.shape), list(q.stride()), [1, 1, r, head_dim]) for n, r in rows.items()}


def compile_ws_forward(head_dim: int = 128, causal: int = 1) -> dict:
    """The warp-specialized Gluon forward (flashfx/codegen/hopper.py) compiled for sm_90a as the
    runtime launches it (bf16, its tiles and register split): shared memory, registers, spill
    bytes and the register reallocations in its PTX. Catches a Triton whose Gluon no longer
    accepts the kernel, without a GPU. Same process rules as compile_sm90."""
    from flashfx.codegen import hopper

    descs = _boxes(hopper.describe, head_dim, QDesc=hopper.BLOCK_M, KDesc=hopper.BLOCK_N, VDesc=hopper.BLOCK_N,
                   ODesc=hopper.BLOCK_M)
    return _compile_gluon(hopper.attn_fwd, descs, hopper.constexprs(head_dim, causal), {"Stats": "*fp32"})


def compile_ws_dkdv(head_dim: int = 128, causal: int = 1, heads_first: bool = False) -> dict:
    """The warp-specialized Gluon dK/dV (flashfx/codegen/hopper_bwd.py) compiled for sm_90a as the
    runtime launches it, as compile_ws_forward does the forward."""
    import torch

    from flashfx.codegen import hopper_bwd as hb

    descs = _boxes(hb.describe, head_dim, QDesc=hb.BLOCK_M, KDesc=hb.BLOCK_K, VDesc=hb.BLOCK_K, dODesc=hb.BLOCK_M)
    rows_of = torch.empty((8, 1024), dtype=torch.float32)  # the row statistics as [B·H, Nq]
    for n in ("LseDesc", "DeltaDesc"):
        descs[n] = hb.describe(rows_of, list(rows_of.shape), list(rows_of.stride()), [1, hb.BLOCK_M])
    return _compile_gluon(hb.attn_bwd_dkdv, descs, hb.constexprs(head_dim, causal, heads_first), {"dK": "*bf16", "dV": "*bf16"})


def compile_ws_dq(head_dim: int = 128, causal: int = 1, heads_first: bool = False) -> dict:
    """The warp-specialized Gluon dQ (flashfx/codegen/hopper_bwd.py) compiled for sm_90a as the
    runtime launches it, as compile_ws_forward does the forward."""
    from flashfx.codegen import hopper_bwd as hb

    descs = _boxes(hb.describe, head_dim, QDesc=hb.DQ_BLOCK_M, KDesc=hb.DQ_BLOCK_N, VDesc=hb.DQ_BLOCK_N,
                   dODesc=hb.DQ_BLOCK_M)
    return _compile_gluon(hb.attn_bwd_dq, descs, hb.dq_constexprs(head_dim, causal, heads_first),
                          {"Out": "*bf16", "dQ": "*bf16", "Lse": "*fp32", "Delta": "*fp32"})


def _run(args):
    job, precision = args
    kern, d, bm, bn, w, s = job
    return dict(kernel=kern, D=d, bm=bm, bn=bn, warps=w, stages=s, **compile_one(job, precision))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="tf32x3", choices=("tf32", "tf32x3", "ieee"))
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/out/sm90_registers.json)")
    args = p.parse_args(argv)
    import triton

    jobs = grid(tuple(int(x) for x in args.head_dims.split(",")))
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(_run, [(j, args.precision) for j in jobs]):
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = args.out or os.path.join(ROOT, "benchmarks", "out", "sm90_registers.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = dict(target="sm_90a (ptxas -v, no device)", triton=triton.__version__, precision=args.precision,
               inputs="fp32", program="causal, scaled", command="PYTHONPATH=. python3 benchmarks/sm90_registers.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    with open(out, "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    print(f"\n{len(rows)} configs, {sum(1 for r in rows if (r.get('spill') or 0) > 0)} spill; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
