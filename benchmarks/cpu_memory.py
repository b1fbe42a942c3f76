"""Peak extra memory of attention on CPU: eager vs flashfx's chunked path.

    python benchmarks/cpu_memory.py [--n 16384] [--d 64] [--heads 1]

Each variant runs in a fresh subprocess: peak resident memory (ru_maxrss) minus the resident
memory once the inputs exist and a small warm-up has loaded the libraries. fp32, B=1.
Writes docs/cpu_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(variant: str, mode: str, n: int, d: int, heads: int) -> dict:
    """Runs in the child: one call of `variant`, returns peak extra bytes and seconds."""
    import torch

    from flashfx.ir import ScoreOp, ScoreProgram
    from flashfx.runtime import cpu

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d) for _ in range(3))
    dout = torch.randn(1, heads, n, d)
    scale = d ** -0.5
    program = ScoreProgram((ScoreOp("scale", None, scale),))

    def eager(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v

    def run(q, k, v):
        if variant == "eager":
            if mode == "fwd":
                with torch.no_grad():
                    return eager(q, k, v)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            eager(q, k, v).backward(dout[..., : q.shape[-2], :])
            return q.grad
        out, lse = cpu.attention_forward(q, k, v, [], program)
        if mode == "fwdbwd":
            return cpu.attention_backward(dout[..., : q.shape[-2], :], q, k, v, out, lse, [], program)
        return out

    small = [t[..., :256, :].clone() for t in (q, k, v)]  # warm-up: library init, thread pools
    run(*small)
    del small
    base = _rss_now()
    t0 = time.perf_counter()
    run(q, k, v)
    seconds = time.perf_counter() - t0
    return {"extra_bytes": max(_peak_rss() - base, 0), "seconds": seconds}


def child(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", args.variant_mode,
           "--n", str(args.n), "--d", str(args.d), "--heads", str(args.heads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/cpu_memory.md")
    args = p.parse_args()
    if args.child:
        variant, mode = args.child.split(":")
        print(json.dumps(measure(variant, mode, args.n, args.d, args.heads)))
        return

    import torch

    results = {}
    for variant in ("eager", "flashfx"):
        for mode in ("fwd", "fwdbwd"):
            args.variant_mode = f"{variant}:{mode}"
            results[variant, mode] = child(args)
            print(f"  {variant:8} {mode:7} {results[variant, mode]['extra_bytes'] / 2**20:9.1f} MiB"
                  f"  {results[variant, mode]['seconds']:6.2f} s", flush=True)

    mib = lambda b: b / 2**20  # noqa: E731
    lines = [
        f"# CPU attention memory: eager vs flashfx chunked path",
        "",
        f"B=1, H={args.heads}, N={args.n}, D={args.d}, fp32. Peak resident memory of one call beyond its",
        "inputs, each variant in a fresh process (`python benchmarks/cpu_memory.py`).",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| mode | eager MiB | flashfx MiB | eager / flashfx | eager s | flashfx s |",
        "|---|---|---|---|---|---|",
    ]
    for mode, name in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        e, f = results["eager", mode], results["flashfx", mode]
        ratio = e["extra_bytes"] / max(f["extra_bytes"], 1)
        lines.append(f"| {name} | {mib(e['extra_bytes']):.1f} | {mib(f['extra_bytes']):.1f} | {ratio:.1f}x "
                     f"| {e['seconds']:.2f} | {f['seconds']:.2f} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if not args.no_doc:
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        with open(os.path.join(ROOT, "docs", "cpu_memory.md"), "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
