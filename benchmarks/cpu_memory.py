"""Peak extra memory of attention on CPU: eager softmax(q·kᵀ·scale) @ v vs flashfx's chunked path.

    PYTHONPATH=. python benchmarks/cpu_memory.py [--n 16384] [--d 64] [--heads 1] [--repeat 3] [--no-doc]

B=1, float32. Four variants — eager and chunked, forward and forward+backward — each in its own
fresh subprocess, so that one's freed memory cannot hide another's peak; each subprocess is run
`--repeat` times and the table shows the median (and the range: what the allocator keeps
resident varies from run to run). In each child:

  1. a small warm-up call of the same variant (library init, thread pools, allocator arenas);
  2. the inputs are allocated and written (q, k, v, dout: 4·N·D floats);
  3. the kernel's peak-RSS mark is reset (/proc/self/clear_refs, "5"), so the peak of
     `import torch` and the warm-up is not counted, and the resident set is read: the baseline;
  4. one timed call; its extra memory = ru_maxrss (peak RSS since the reset) - baseline.

Eager forward runs under no_grad; eager forward+backward uses autograd (q, k, v require grad).
The chunked path calls flashfx.runtime.cpu.attention_forward, then attention_backward
explicitly, with the default chunk rule. Outputs and gradients count as extra for both.

Prints a table and writes it to docs/cpu_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("eager", "chunked")
MODES = ("fwd", "fwdbwd")
MIB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark that ru_maxrss reports (Linux ≥ 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_rss() <= _rss_now() + 1 * MIB


def measure(variant: str, mode: str, n: int, d: int, heads: int) -> dict:
    """In the child process: one call of `variant` in `mode`; extra bytes and seconds."""
    import gc

    import torch

    from flashfx.ir import ScoreOp, ScoreProgram
    from flashfx.runtime import cpu

    scale = d**-0.5
    program = ScoreProgram((ScoreOp("scale", None, scale),))

    def eager(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v

    def run(q, k, v, dout):
        if variant == "eager":
            if mode == "fwd":
                with torch.no_grad():
                    return eager(q, k, v)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            eager(q, k, v).backward(dout)
            return q.grad, k.grad, v.grad
        out, lse = cpu.attention_forward(q, k, v, [], program)
        if mode == "fwd":
            return out, lse
        return cpu.attention_backward(dout, q, k, v, out, lse, [], program)

    gen = torch.Generator().manual_seed(0)
    warm = [torch.randn(1, heads, 512, d, generator=gen) for _ in range(4)]
    run(*warm)
    del warm
    q, k, v, dout = (torch.randn(1, heads, n, d, generator=gen) for _ in range(4))  # written: resident
    gc.collect()

    reset = _reset_peak_rss()
    base = _rss_now()
    t0 = time.perf_counter()
    result = run(q, k, v, dout)
    seconds = time.perf_counter() - t0
    extra = _peak_rss() - base
    del result
    return {"extra_bytes": max(extra, 0), "seconds": seconds, "peak_reset": reset,
            "threads": torch.get_num_threads()}


def _child(variant: str, mode: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{variant}:{mode}",
           "--n", str(args.n), "--d", str(args.d), "--heads", str(args.heads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{variant}:{mode} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/cpu_memory.md")
    args = p.parse_args()
    if args.child:
        variant, mode = args.child.split(":")
        print(json.dumps(measure(variant, mode, args.n, args.d, args.heads)))
        return

    import torch

    from flashfx.runtime import cpu

    runs = {}
    for variant in VARIANTS:
        for mode in MODES:
            runs[variant, mode] = []
            for _ in range(args.repeat):
                res = _child(variant, mode, args)
                runs[variant, mode].append(res)
                print(f"  {variant:8} {mode:7} {res['extra_bytes'] / MIB:9.1f} MiB  {res['seconds']:6.2f} s", flush=True)
    # per variant and mode: median extra bytes, its range, median seconds
    r = {key: {"extra_bytes": statistics.median(x["extra_bytes"] for x in xs),
               "lo": min(x["extra_bytes"] for x in xs), "hi": max(x["extra_bytes"] for x in xs),
               "seconds": statistics.median(x["seconds"] for x in xs), "threads": xs[0]["threads"]}
         for key, xs in runs.items()}

    def mib(variant, mode):
        x = r[variant, mode]
        return f"{x['extra_bytes'] / MIB:.1f} ({x['lo'] / MIB:.0f}–{x['hi'] / MIB:.0f})"

    def ratio(variant, mode):
        return f"{r['eager', mode]['extra_bytes'] / max(r[variant, mode]['extra_bytes'], 1):.1f}x"

    def worst_ratio(mode):
        return f"{r['eager', mode]['lo'] / max(r['chunked', mode]['hi'], 1):.0f}x"

    cq, ck = cpu.default_chunk_sizes(args.heads, args.n, args.n)
    reset = all(x["peak_reset"] for xs in runs.values() for x in xs)
    lines = [
        "# CPU attention memory: eager vs flashfx's chunked path",
        "",
        f"B=1, H={args.heads}, N={args.n}, D={args.d}, float32, no mask. Peak resident memory of one call",
        f"beyond its inputs, each variant in a fresh process after a warm-up, {args.repeat} processes per",
        "variant: median MiB (min–max) and median seconds",
        "(`PYTHONPATH=. python benchmarks/cpu_memory.py`; the method is in its docstring).",
        f"Chunked path: default chunk rule, q_chunk={cq}, k_chunk={ck} "
        f"(`flashfx.runtime.cpu.default_chunk_sizes`).",
        f"torch {torch.__version__}, {_cpu_name()}, {os.cpu_count()} cores, "
        f"{r['eager', 'fwd']['threads']} torch threads.",
        "",
        "| variant | fwd MiB | fwd+bwd MiB | eager / this, fwd | eager / this, fwd+bwd | fwd s | fwd+bwd s |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        lines.append(f"| {variant} | {mib(variant, 'fwd')} | {mib(variant, 'fwdbwd')} | {ratio(variant, 'fwd')} "
                     f"| {ratio(variant, 'fwdbwd')} | {r[variant, 'fwd']['seconds']:.2f} "
                     f"| {r[variant, 'fwdbwd']['seconds']:.2f} |")
    lines += ["", f"Worst case over the runs (least eager / most chunked): {worst_ratio('fwd')} forward, "
              f"{worst_ratio('fwdbwd')} forward+backward."]
    if not reset:
        lines += ["", "The peak-RSS mark could not be reset here: the numbers include the warm-up's peak "
                  "where it was higher (an overestimate)."]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if not args.no_doc:
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        with open(os.path.join(ROOT, "docs", "cpu_memory.md"), "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
