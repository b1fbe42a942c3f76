"""The forward's two paths side by side: the generated Triton forward and the warp-specialized
Gluon forward (sm_90), against cuDNN, one process.

    PYTHONPATH=. python3 benchmarks/forward_paths.py            # the shapes below, bf16
    PYTHONPATH=. python3 benchmarks/forward_paths.py --tiny     # CPU smoke run (Triton interpreter)

Per shape, through the runtime's forward call (`gpu._forward_call`, the launches a compiled
model makes):

- "generated": the generated Triton forward (`gpu.WS_FORWARD = False`);
- "chosen": the forward flashfx runs, the warp-specialized kernel where `hopper.supports` takes it;
- "ws": the warp-specialized kernel also where the head-dim-64 rule declines it (without that
  rule; other reasons still decline it, and then the column is empty);
- "cudnn": SDPA's cuDNN backend (on CPU: SDPA's own choice).

The variants take turns: `--rounds` rounds, each starting one variant later; the median round
is reported, in TFLOP/s (causal counts half the products). Every result is checked against fp32
math attention on two heads. Writes forward_paths.json and forward_paths.png under $OUT (else
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
from flashfx.codegen import hopper  # noqa: E402
from flashfx.ir import ScoreOp, ScoreProgram  # noqa: E402
from flashfx.runtime import gpu  # noqa: E402

# (label, B, H, N, D, causal, q/k/v as views of one projection)
SHAPES = [("GPT-2 layer, seq 4096", 2, 12, 4096, 64, True, True),
          ("GPT-2 layer, seq 1024", 8, 12, 1024, 64, True, True),
          ("D=64 N=4096 causal", 4, 32, 4096, 64, True, False),
          ("D=64 N=4096", 4, 32, 4096, 64, False, False),
          ("D=128 N=1024 causal", 16, 16, 1024, 128, True, False),
          ("D=128 N=1024", 16, 16, 1024, 128, False, False),
          ("D=128 N=4096 causal", 4, 16, 4096, 128, True, False),
          ("D=128 N=16384 causal", 1, 16, 16384, 128, True, False)]
TINY = [("tiny causal", 1, 2, 96, 16, True, False), ("tiny views", 1, 2, 64, 32, False, True)]
VARIANTS = ("generated", "chosen", "ws", "cudnn")


def inputs(B, H, N, D, views, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    if views:  # as a model's one projection makes them: [B, H, N, D] views, rows 3·H·D apart
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, generator=g)
        return [x.view(B, N, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2)]
    return [torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3)]


_d64_rule = hopper.d64_rule


def _no_rule(*args):  # the "ws" column: the kernel also where the head-dim-64 rule declines it
    return None


def calls(q, k, v, prog):
    """{variant: (function, whether it runs the warp-specialized kernel)} for the flashfx paths."""
    out = {}
    saved = gpu.WS_FORWARD
    try:
        gpu.WS_FORWARD = False
        call = gpu._forward_call(q, k, v, [], prog, gpu.tile_plan(q, k, prog))
        out["generated"] = (lambda: call(q, k, v, [], None)[0], call.warp_specialized)
        gpu.WS_FORWARD = None
        call_c = gpu._forward_call(q, k, v, [], prog, gpu.tile_plan(q, k, prog))
        out["chosen"] = (lambda: call_c(q, k, v, [], None)[0], call_c.warp_specialized)
        hopper.d64_rule = _no_rule
        call_w = gpu._forward_call(q, k, v, [], prog, gpu.tile_plan(q, k, prog))
        if call_w.warp_specialized:
            out["ws"] = (lambda: call_w(q, k, v, [], None)[0], True)
    finally:
        gpu.WS_FORWARD = saved
        hopper.d64_rule = _d64_rule
    return out


def peer(q, k, v, causal, cuda: bool):
    if not cuda:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def error(o, q, k, v, causal) -> float:
    """Max relative error on the first two heads against fp32 math attention."""
    hs = slice(0, 2)
    ref = F.scaled_dot_product_attention(q[:1, hs].float(), k[:1, hs].float(), v[:1, hs].float(), is_causal=causal)
    return ((o[:1, hs].float() - ref).abs().max() / ref.abs().max()).item()


def timer(cuda: bool, rep_ms: float):
    if cuda:
        import triton

        return lambda f: triton.testing.do_bench(f, warmup=10, rep=rep_ms, return_mode="median")
    import time

    def cpu(f):
        f()
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) * 1e3
    return cpu


def measure(shapes, rounds: int, rep_ms: float, device: str) -> list[dict]:
    cuda = device == "cuda"
    bench = timer(cuda, rep_ms)
    rows = []
    for i, (label, B, H, N, D, causal, views) in enumerate(shapes):
        q, k, v = inputs(B, H, N, D, views, torch.bfloat16 if cuda else torch.float32, device, seed=i)
        prog = ScoreProgram((ScoreOp("scale", None, D ** -0.5),), "top_left" if causal else None)
        paths = calls(q, k, v, prog)
        fns = {name: f for name, (f, _) in paths.items()}
        fns["cudnn"] = peer(q, k, v, causal, cuda)
        errors = {name: error(f(), q, k, v, causal) for name, f in fns.items()}
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):  # each round starts one variant later
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(bench(fns[name]))
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        ms = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        rows.append(dict(label=label, B=B, H=H, N=N, D=D, causal=causal, views=views,
                         ws_taken=paths["chosen"][1], tflops={n: flops / t / 1e9 for n, t in ms.items()},
                         ms_rounds=times, errors=errors,
                         pairs_per_sm=_pairs_per_sm(B * H, N, q.device) if cuda else None))
        print(_row(rows[-1]), flush=True)
    return rows


def _pairs_per_sm(batch_heads, n, device) -> float:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return hopper.schedule(batch_heads, n, sms)[1][0] / sms


def _cell(row, name) -> str:
    t = row["tflops"].get(name)
    if t is None:
        return "—"
    return f"{t:.0f} ({t / row['tflops']['cudnn']:.2f})"


def _row(r) -> str:
    pairs = "—" if r["pairs_per_sm"] is None else f"{r['pairs_per_sm']:.1f}"
    ratio = r["tflops"]["chosen"] / r["tflops"]["generated"]
    return (f"| {r['label']} | {pairs} | {'yes' if r['ws_taken'] else 'no'} | "
            + " | ".join(_cell(r, n) for n in VARIANTS) + f" | {ratio:.3f} | {max(r['errors'].values()):.1e} |")


def table(rows) -> str:
    head = ("| shape | pairs an SM | ws taken | generated | chosen | ws | cudnn | chosen / generated | max err |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rows])


def plot(rows, variants, ylabel: str, path: str, env: str) -> None:
    plt = plots.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    series = {n: [r["tflops"].get(n, 0.0) for r in rows] for n in variants}
    plots.grouped_bars(ax, [r["label"] for r in rows], series)
    plots.save(fig, ax, ylabel, path, env)
    plt.close(fig)


def refuse(name: str, tiny: bool) -> int | None:
    """The exit code when this run cannot go on here (with why, on stderr); else None."""
    if tiny and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"{name} --tiny: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not tiny and not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    return None


def finish(name: str, rows: list[dict], cuda: bool, what: str, table_text: str, variants, ylabel: str,
           what_is_off: str = "results") -> int:
    """Print the environment and the table, write <name>.json and <name>.png under $OUT (else
    benchmarks/out); 1 when a row's error against fp32 attention is over the dtype's tolerance."""
    import triton

    gpu_name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    env = plots.env_line(gpu_name, torch.__version__, triton.__version__)
    print(f"\n{env}; {'bf16' if cuda else 'fp32'}; {what}\n")
    print(table_text)
    out = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"gpu": gpu_name, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                  indent=1)
    plot(rows, variants, ylabel, os.path.join(out, f"{name}.png"), env)
    bad = [r["label"] for r in rows if max(r["errors"].values()) > (2e-2 if cuda else 1e-4)]
    if bad:
        print(f"{what_is_off} off fp32 attention: {', '.join(bad)}")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (Triton interpreter); times mean nothing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench's measuring time a round")
    args = p.parse_args(argv)
    refused = refuse("forward_paths", args.tiny)
    if refused is not None:
        return refused
    cuda = not args.tiny
    rows = measure(TINY if args.tiny else SHAPES, args.rounds, args.rep_ms, "cuda" if cuda else "cpu")
    return finish("forward_paths", rows, cuda, f"TFLOP/s (ratio to cuDNN), median of {args.rounds} rounds in turns",
                  table(rows), VARIANTS, "TFLOP/s")


if __name__ == "__main__":
    sys.exit(main())
