"""Host time of one fused attention call (forward + backward), split by layer, on a GPU.

    PYTHONPATH=. python3 benchmarks/host_overhead.py                 # GPT-2 small shapes
    PYTHONPATH=. python3 benchmarks/host_overhead.py --shapes 2:12:4096:64
    PYTHONPATH=. python3 benchmarks/host_overhead.py --steps 16:16:1024:128:causal

A training step is host-bound when the host needs longer to enqueue its kernels than the GPU
needs to run them. For each shape and each way of reading tiles (tensor descriptors, pointers)
this times, per iteration of forward + backward, with no synchronization inside the loop:

    op        torch.ops.flashfx.attention + attention_backward, as a compiled graph calls them
    direct    flashfx.runtime.gpu.forward + backward (no dispatcher)
    jit       the same with every launch through Triton's JIT (gpu.DIRECT_LAUNCH = False)
    launches  the three Triton launches alone, through its JIT, with flashfx's arguments
    empties   the output allocations alone

`host` is the time to enqueue 100 iterations over 100; `wall` adds the wait for the GPU, so a
row whose wall exceeds its host time is GPU-bound. Writes host_overhead.json and .png under
$OUT when set, else benchmarks/out.

`--steps` times whole compiled training steps of the attention table's naive form instead
(forward, then backward, as benchmarks/attention.py runs them): flashfx as torch.compile gives
it a graph of one fused site (which skips inductor), flashfx with options={"inner":
"inductor"}, compiled FlexAttention and eager SDPA on cuDNN. `busy host` enqueues 20 steps
behind a long GPU sleep, so the GPU never holds the host back; `free host` and `wall` time 20
steps run as they come. Writes host_steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flashfx  # noqa: E402,F401 - registers the op
from benchmarks import plots  # noqa: E402
from flashfx.ir import ScoreOp, ScoreProgram  # noqa: E402
from flashfx.runtime import gpu  # noqa: E402

KERNELS = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
PARTS = ("op", "direct", "jit", "launches", "empties")


def host_and_wall(f, n: int = 100) -> tuple[float, float]:
    """(host µs, wall µs) per call of f over n calls, after 5 warm-up calls."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    return host * 1e6, wall * 1e6


def recorded_launches(kern, call) -> list:
    """The (kernel, grid, args, kwargs) of every launch `call()` makes."""
    seen, orig = [], {n: getattr(kern, n) for n in KERNELS}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, attr):  # arg_names and the rest: the kernel's own
            return getattr(orig[self.name], attr)

        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append((orig[self.name], grid, a, kw))
                return orig[self.name][grid](*a, **kw)
            return launch

    try:
        for n in KERNELS:
            setattr(kern, n, Recorder(n))
        call()
    finally:
        for n in KERNELS:
            setattr(kern, n, orig[n])
    return seen


def measure(B: int, H: int, N: int, D: int) -> list[dict]:
    prog = ScoreProgram((ScoreOp("scale", None, D ** -0.5),), "top_left")
    enc = prog.encode()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))

    def op():
        out, st = torch.ops.flashfx.attention.default(q, k, v, [], enc)
        torch.ops.flashfx.attention_backward.default(do, q, k, v, out, st, [], enc, [], None)

    def direct():
        out, st = gpu.forward(q, k, v, [], prog)
        gpu.backward(do, q, k, v, out, st, [], prog)

    def jit():
        gpu.DIRECT_LAUNCH = False
        try:
            direct()
        finally:
            gpu.DIRECT_LAUNCH = True

    def planned_afresh():  # with the tiles given, every launcher is made again: all are recorded
        tiles = gpu.tile_plan(q, k, prog)
        out, st = gpu.forward(q, k, v, [], prog, tiles)
        gpu.backward(do, q, k, v, out, st, [], prog, tiles)

    def empties():
        torch.empty_like(q), torch.empty((2, B, H, N), device="cuda"), torch.empty((B, H, N), device="cuda")
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    rows = []
    saved = gpu.TMA
    try:
        for reads, tma in (("descriptors", None), ("pointers", False)):
            gpu.TMA = tma
            launches = recorded_launches(gpu._kernels(prog), planned_afresh)

            def raw():
                for kernel, grid, a, kw in launches:
                    kernel[grid](*a, **kw)

            for part, f in zip(PARTS, (op, direct, jit, raw, empties)):
                host, wall = host_and_wall(f)
                rows.append(dict(B=B, H=H, N=N, D=D, reads=reads, part=part, host_us=host, wall_us=wall))
                print(f"B={B} H={H} N={N} D={D} {reads:11s} {part:9s} host {host:7.1f} us  wall {wall:7.1f} us",
                      flush=True)
    finally:
        gpu.TMA = saved
    return rows


STEP_VARIANTS = ("flashfx", "flashfx-inductor", "flex", "cudnn")


def step_variants() -> dict:
    """{name: fn(q, k, v, causal)}: the attention table's runners (benchmarks/attention.py), and
    flashfx with options={"inner": "inductor"} beside them."""
    from benchmarks.attention import make_variants, naive_attention

    table = make_variants("flashfx")
    # its own lambda: Dynamo keeps compiled code by code object, and the table's is compiled
    # without options
    inductor = {c: torch.compile(lambda q, k, v, c=c: naive_attention(q, k, v, c), backend="flashfx",
                                 options={"inner": "inductor"}) for c in (False, True)}
    table["flashfx-inductor"] = lambda q, k, v, causal: inductor[causal](q, k, v)
    return {name: table[name] for name in STEP_VARIANTS}


def measure_steps(B: int, H: int, N: int, D: int, causal: bool, n: int = 20, rounds: int = 5) -> list[dict]:
    """Each variant's step, the variants taking turns for `rounds` rounds (round r starts at the
    r-th variant); the medians over rounds."""
    import statistics

    from benchmarks.attention import in_turns

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    steps = {}
    for name, fn in step_variants().items():
        def step(fn=fn):
            q.grad = k.grad = v.grad = None
            fn(q, k, v, causal).backward(do)

        for _ in range(5):  # the first compiles
            step()
        steps[name] = step
    torch.cuda.synchronize()

    def timed(step, first):
        torch.cuda._sleep(int(2e9))  # the GPU sleeps long enough for the host to enqueue n steps
        t = time.perf_counter()
        for _ in range(n):
            step()
        busy = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        return (busy,) + host_and_wall(step, n)

    rows = []
    for name, got in in_turns(steps, rounds, timed).items():
        busy, free, wall = (statistics.median(x) for x in zip(*got))
        rows.append(dict(B=B, H=H, N=N, D=D, causal=causal, variant=name, busy_host_us=busy,
                         free_host_us=free, wall_us=wall, rounds=got))
        print(f"B={B} H={H} N={N} D={D} causal={causal} {name:16s} busy host {busy:7.1f} us  "
              f"free host {free:7.1f} us  wall {wall:7.1f} us", flush=True)
    return rows


def plot(rows: list[dict], path: str, env: str | None = None) -> None:
    plt = plots.pyplot()
    if plt is None:
        return
    key = lambda r: (r["B"], r["H"], r["N"], r["D"], r["reads"])  # noqa: E731
    groups = sorted({key(r) for r in rows})
    mine = {(key(r), r["part"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width, _ = plots.grouped_bars(ax, [f"B{b} H{h} N{n} D{d}\n{r}" for b, h, n, d, r in groups],
                                  {p: [mine[g, p]["host_us"] for g in groups] for p in PARTS})
    ax.scatter([j + width for j in range(len(groups))], [mine[g, "direct"]["wall_us"] for g in groups],
               color="k", marker="_", s=400, label="GPU-bound wall")
    plots.save(fig, ax, "host µs per fwd+bwd", path, env)


def save(rows: list[dict], name: str) -> tuple[str, dict]:
    """Writes the rows and the GPU and versions as `name` under $OUT (else benchmarks/out)."""
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    return out_dir, env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2:12:4096:64,8:12:1024:64", help="B:H:N:D, comma-separated")
    p.add_argument("--steps", help="B:H:N:D[:causal], comma-separated: time compiled training steps instead")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.steps:
        return main_steps(args.steps)
    rows = []
    for spec in args.shapes.split(","):
        rows += measure(*(int(x) for x in spec.split(":")))
    out_dir, env = save(rows, "host_overhead.json")
    plot(rows, os.path.join(out_dir, "host_overhead.png"), plots.env_line(**env))
    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}")
    print("| shape | reads | " + " | ".join(f"{p} host µs" for p in PARTS) + " | wall µs (direct) |")
    print("|---|---|" + "---|" * (len(PARTS) + 1))
    for gkey in sorted({(r["B"], r["H"], r["N"], r["D"], r["reads"]) for r in rows}):
        mine = {r["part"]: r for r in rows if (r["B"], r["H"], r["N"], r["D"], r["reads"]) == gkey}
        print(f"| B={gkey[0]} H={gkey[1]} N={gkey[2]} D={gkey[3]} | {gkey[4]} | "
              + " | ".join(f"{mine[p]['host_us']:.0f}" for p in PARTS) + f" | {mine['direct']['wall_us']:.0f} |")
    return 0


def main_steps(specs: str) -> int:
    rows = []
    for spec in specs.split(","):
        parts = spec.split(":")
        rows += measure_steps(*(int(x) for x in parts[:4]), causal=parts[4:] == ["causal"])
    _, env = save(rows, "host_steps.json")
    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}")
    print("| shape | variant | busy host µs | free host µs | wall µs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| B={r['B']} H={r['H']} N={r['N']} D={r['D']}{' causal' if r['causal'] else ''} | {r['variant']} | "
              f"{r['busy_host_us']:.0f} | {r['free_host_us']:.0f} | {r['wall_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
