"""The backward's paths side by side: the generated Triton dQ and dK/dV, the warp-specialized
Gluon dK/dV after the generated dQ, and both Gluon kernels (sm_90), against cuDNN's backward, one
process.

    PYTHONPATH=. python3 benchmarks/backward_paths.py            # the shapes below, bf16
    PYTHONPATH=. python3 benchmarks/backward_paths.py --tiny     # CPU smoke run (Triton interpreter)

Per shape, through the runtime's backward call (`gpu._backward_call`, the launches a compiled
model makes), from the forward's own output and statistics:

- "generated": dQ and Δ, then dK/dV, both generated (`gpu.WS_BACKWARD = False`);
- "ws-dkdv": the generated dQ, then the warp-specialized dK/dV (`gpu.WS_DQ = False`);
- "chosen": the backward flashfx runs, the warp-specialized dQ and dK/dV where they take the call;
- "cudnn": SDPA's cuDNN backend's backward (on CPU: SDPA's own choice).

On the GPU each variant is timed by the profiler's kernel times over --calls calls (the sum of
its kernels, so host time does not count), dQ and dK/dV apart; on the CPU by the wall clock of
one call. The variants take turns: --rounds rounds, each starting one variant later; the median
round is reported. Every variant's gradients are checked against fp32 math attention on two
heads. Writes backward_paths.json and backward_paths.png under $OUT (else benchmarks/out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.forward_paths import finish, inputs, peer, refuse  # noqa: E402
from flashfx.ir import ScoreOp, ScoreProgram  # noqa: E402
from flashfx.runtime import gpu  # noqa: E402

# (label, B, H, N, D, causal, q/k/v as views of one projection)
SHAPES = [("D=128 N=1024", 16, 16, 1024, 128, False, False),
          ("D=128 N=1024 causal", 16, 16, 1024, 128, True, False),
          ("D=128 N=4096", 4, 16, 4096, 128, False, False),
          ("D=128 N=4096 causal", 4, 16, 4096, 128, True, False),
          ("D=128 N=16384", 1, 16, 16384, 128, False, False),
          ("D=128 N=16384 causal", 1, 16, 16384, 128, True, False),
          ("GPT-2 layer, seq 4096", 2, 12, 4096, 64, True, True),
          ("GPT-2 layer, seq 1024", 8, 12, 1024, 64, True, True),
          ("D=64 N=4096", 4, 16, 4096, 64, False, False)]
TINY = [("tiny causal", 1, 2, 96, 16, True, False), ("tiny views", 1, 2, 64, 32, False, True)]
VARIANTS = ("generated", "ws-dkdv", "chosen", "cudnn")
OURS = VARIANTS[:3]


def calls(q, k, v, do, prog):
    """{variant: (function returning (dq, dk, dv), which of dQ and dK/dV are warp-specialized)}."""
    out_, stats = gpu.forward(q, k, v, [], prog)
    paths = {}
    saved = gpu.WS_BACKWARD, gpu.WS_DQ
    try:
        for name, switches in (("generated", (False, None)), ("ws-dkdv", (None, False)), ("chosen", (None, None))):
            gpu.WS_BACKWARD, gpu.WS_DQ = switches
            call = gpu._backward_call(do, q, k, v, out_, stats, [], prog, (), gpu.tile_plan(q, k, prog))
            taken = "+".join(n for n, ws in (("dQ", call.warp_specialized_dq), ("dK/dV", call.warp_specialized_dkdv)) if ws)
            paths[name] = ((lambda c: lambda: c(do, q, k, v, out_, stats, [], None)[:3])(call), taken or "none")
    finally:
        gpu.WS_BACKWARD, gpu.WS_DQ = saved
    return paths


def cudnn_backward(q, k, v, do, causal, cuda: bool):
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = peer(qc, kc, vc, causal, cuda)()
    return lambda: torch.autograd.grad(o, (qc, kc, vc), do, retain_graph=True)


def error(grads, q, k, v, do, causal) -> float:
    """Max relative error of dq, dk, dv on the first two heads against fp32 math attention."""
    hs = slice(0, 2)
    ref_in = [t[:1, hs].detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal)
    want = torch.autograd.grad(ref, ref_in, do[:1, hs].float())
    return max(((g[:1, hs].float() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, want))


def kernel_us(fn, n_calls: int) -> dict[str, float]:
    """µs a call of each kernel `fn` launches, from the profiler (device time only)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n_calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key] = out.get(e.key, 0.0) + e.self_device_time_total / n_calls
    return out


def wall_us(fn) -> dict[str, float]:
    fn()
    t = time.perf_counter()
    fn()
    return {"call": (time.perf_counter() - t) * 1e6}


def measure(shapes, rounds: int, n_calls: int, device: str) -> list[dict]:
    cuda = device == "cuda"
    rows = []
    for i, (label, B, H, N, D, causal, views) in enumerate(shapes):
        dtype = torch.bfloat16 if cuda else torch.float32
        q, k, v = inputs(B, H, N, D, views, dtype, device, seed=i)
        do = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(i))
        prog = ScoreProgram((ScoreOp("scale", None, D ** -0.5),), "top_left" if causal else None)
        paths = calls(q, k, v, do, prog)
        fns = {name: f for name, (f, _) in paths.items()}
        fns["cudnn"] = cudnn_backward(q, k, v, do, causal, cuda)
        errors = {name: error(f(), q, k, v, do, causal) for name, f in fns.items()}
        kernels = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):  # each round starts one variant later
            for name in names[r % len(names):] + names[:r % len(names)]:
                kernels[name].append(kernel_us(fns[name], n_calls) if cuda else wall_us(fns[name]))
        total = {n: sorted(sum(k.values()) for k in ks)[len(ks) // 2] for n, ks in kernels.items()}
        part = {which: {n: sorted(sum(t for name, t in k.items() if which in name) for k in kernels[n])[rounds // 2]
                        for n in OURS} for which in ("dq", "dkdv")} if cuda else {}
        flops = 2.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        rows.append(dict(label=label, B=B, H=H, N=N, D=D, causal=causal, views=views,
                         ws_taken=paths["chosen"][1], us=total, dq_us=part.get("dq", {}), dkdv_us=part.get("dkdv", {}),
                         kernels=kernels, errors=errors, tflops={n: flops / t / 1e6 for n, t in total.items()}))
        print(_row(rows[-1]), flush=True)
    return rows


def _row(r) -> str:
    us, dq, dk = r["us"], r["dq_us"], r["dkdv_us"]
    split = (f"{dq['generated']:.0f} → {dq['chosen']:.0f} | {dk['generated']:.0f} → {dk['chosen']:.0f}" if dk
             else "— | —")
    return (f"| {r['label']} | {r['ws_taken']} | {split} | " + " | ".join(f"{us[n]:.0f}" for n in VARIANTS)
            + " | " + " → ".join(f"{us['cudnn'] / us[n]:.3f}" for n in OURS) + f" | {max(r['errors'].values()):.1e} |")


def table(rows) -> str:
    head = ("| shape | Gluon kernels taken | dQ generated → chosen | dK/dV generated → chosen | backward generated | "
            "backward ws-dkdv | backward chosen | cuDNN backward | ×cuDNN generated → ws-dkdv → chosen | max err |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (Triton interpreter); times mean nothing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10, help="calls a round, under the profiler")
    args = p.parse_args(argv)
    refused = refuse("backward_paths", args.tiny)
    if refused is not None:
        return refused
    cuda = not args.tiny
    rows = measure(TINY if args.tiny else SHAPES, args.rounds, args.calls, "cuda" if cuda else "cpu")
    how = "kernel µs a call (profiler)" if cuda else "wall µs a call"
    return finish("backward_paths", rows, cuda, f"{how}, median of {args.rounds} rounds in turns", table(rows),
                  VARIANTS, "backward TFLOP/s", "gradients")


if __name__ == "__main__":
    sys.exit(main())
