"""flashfx side by side with SDPA (cuDNN, flash), compiled FlexAttention and eager, on one GPU.

    python benchmarks/attention.py              # every shape, fwd and fwd+bwd
    python benchmarks/attention.py --quick      # two shapes, a smoke run
    python benchmarks/attention.py --variants flashfx,flashfx-tuned,cudnn,flex --shapes 128:4096

flashfx compiles attention the way users write it:
    softmax(q @ k.transpose(-2, -1) * scale [masked_fill(causal, -inf)], dim=-1) @ v
Shapes follow B·N = 16384 tokens, H·D = 2048, bf16. FLOPs: fwd 4·B·H·N²·D (halved when
causal), fwd+bwd 3.5× fwd. Memory is the peak allocated beyond the inputs during one call.

Timing: the variants of a row are timed in turns, --rounds rounds of triton.testing.do_bench
(median of --rep-ms), each round starting one variant later, and each variant's TFLOP/s comes
from its median round. The GPU's clock drifts over a run (the same kernel moved by up to 8%
between processes on an H200): timing variants one after another puts that drift into their
ratios, taking turns spreads it over all of them. The table's "ffx ±%" is the spread of
flashfx's rounds, (max − min) / median.

Writes a table, JSON and a plot under $OUT (or benchmarks/out/), and the table into
docs/benchmarks.md between its markers (the notes around them stay).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import plots  # noqa: E402

SHAPES = [(D, N, causal) for D in (64, 128) for N in (1024, 4096, 16384) for causal in (False, True)]
VARIANTS = ["flashfx", "flashfx-tuned", "cudnn", "flash", "flex", "eager"]
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "flashfx-tuned"]


def naive_attention(q, k, v, causal: bool):  # q, k, v: [B, H, N, D]
    s = q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5)
    if causal:
        n = q.size(-2)
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_variants(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = {c: torch.compile(lambda q, k, v, c=c: naive_attention(q, k, v, c), backend=backend) for c in (False, True)}
    # flashfx with options={"autotune": True}: the first call of a site times the planner's top
    # candidates of each kernel (both dK/dV orientations among them) and keeps the fastest
    tuned = {c: torch.compile(lambda q, k, v, c=c: naive_attention(q, k, v, c), backend="flashfx",
                              options={"autotune": True}) for c in (False, True)}
    flex = torch.compile(flex_attention)
    block_masks = {}

    def sdpa(which):
        def run(q, k, v, causal):
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def flex_run(q, k, v, causal):
        bm = None
        if causal:
            key = (q.shape[-2], q.device)
            if key not in block_masks:
                block_masks[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[-2], q.shape[-2], device=q.device)
            bm = block_masks[key]
        return flex(q, k, v, block_mask=bm)

    return {
        "flashfx": lambda q, k, v, causal: compiled[causal](q, k, v),
        "flashfx-tuned": lambda q, k, v, causal: tuned[causal](q, k, v),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "flex": flex_run,
        "eager": naive_attention,
    }


def eager_bytes(B, H, N, elt=2) -> int:
    return 4 * B * H * N * N * elt  # scores, probabilities and their grads


def prepare(fn, B, H, N, D, causal, mode, device, dtype):
    """(step, FLOPs of one step, extra peak GiB, relative errors) of one variant at one shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0) * (3.5 if mode == "fwdbwd" else 1.0)

    # correctness against fp32 math attention on the same inputs
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    if mode == "fwd":
        with torch.no_grad():
            out = fn(q, k, v, causal)
        errors = {"out": rel(out, ref)}
        del out

        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
    else:
        ref.backward(dout.float())
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg, causal)
        out.backward(dout)
        errors = {"out": rel(out, ref), "dq": rel(qg.grad, qf.grad), "dk": rel(kg.grad, kf.grad), "dv": rel(vg.grad, vf.grad)}
        del out

        def step():
            qg.grad = kg.grad = vg.grad = None
            fn(qg, kg, vg, causal).backward(dout)
    del ref, qf, kf, vf
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    return step, flops, extra, errors


def in_turns(steps: dict, rounds: int, time_ms) -> dict:
    """{name: [ms of each round]}: every step timed once a round, round r starting at the r-th
    name, so that no variant always runs first or right after the same one. time_ms(step,
    first) times one step (first: its first round, which also warms it up); a step that
    raises is dropped from the later rounds and its name maps to the exception."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if isinstance(times[name], Exception):
                continue
            try:
                times[name].append(time_ms(steps[name], r == 0))
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest
                times[name] = e
    return times


def _do_bench_ms(rep_ms: float):
    from triton.testing import do_bench

    return lambda step, first: do_bench(step, warmup=25 if first else 5, rep=rep_ms, return_mode="median")


def run(args):
    device, dtype = "cuda", torch.bfloat16
    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    shapes = SHAPES[:: len(SHAPES) // 2][:2] if args.quick else SHAPES
    if args.shapes:  # e.g. "128:1024,64:4096"
        wanted = {tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")}
        shapes = [s for s in shapes if s[:2] in wanted]
    rows = []
    for D, N, causal in shapes:
        B, H = 16384 // N, 2048 // D
        for mode in args.modes.split(","):
            # Compile afresh for every shape and mode, as a model of that shape would be: one
            # compiled function reused across 24 shapes would hit Dynamo's recompile limit and
            # fall back to eager (for flashfx and FlexAttention alike).
            torch._dynamo.reset()
            variants = make_variants(args.backend)
            row = {"D": D, "N": N, "B": B, "H": H, "causal": causal, "mode": mode}
            steps, flops = {}, {}
            for name in chosen:
                if name == "eager" and eager_bytes(B, H, N) > args.eager_cap_gib * 2**30:
                    row[name] = {"skipped": f"N×N scores over {args.eager_cap_gib} GiB"}
                    continue
                try:
                    steps[name], flops[name], gib, err = prepare(variants[name], B, H, N, D, causal, mode, device, dtype)
                    row[name] = {"extra_gib": gib, "errors": err}
                    if name == "flashfx" and args.backend == "flashfx":
                        row[name]["sites"] = _explain(B, H, N, D, causal, device, dtype)
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    steps.pop(name, None)
                torch.cuda.empty_cache()
            for name, ms in in_turns(steps, args.rounds, _do_bench_ms(args.rep_ms)).items():
                if isinstance(ms, Exception):
                    row[name] = {"error": f"{type(ms).__name__}: {str(ms)[:200]}"}
                    continue
                row[name].update(tflops=flops[name] / statistics.median(ms) * 1e-9,
                                 tflops_rounds=[flops[name] / t * 1e-9 for t in ms])
            del steps
            torch.cuda.empty_cache()
            rows.append(row)
            print(_row_text(row, chosen), flush=True)
            if args.partial:  # keep what is measured so far if the run is cut short
                with open(args.partial, "w") as f:
                    json.dump(rows, f)
    return rows, chosen


def _explain(B, H, N, D, causal, device, dtype) -> list[str]:
    """What flashfx made of the naive form at this shape: one line per site."""
    import flashfx

    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    report = flashfx.explain(lambda q, k, v: naive_attention(q, k, v, causal), q, k, v)
    return [s.program if s.fused else f"NOT fused: {s.reason}" for s in report.sites]


def _cell(r):
    if "tflops" in r:
        return f"{r['tflops']:.0f}"
    return "—" if "skipped" in r else "err"


def _row_text(row, chosen):
    sites = row.get("flashfx", {}).get("sites")
    return f"D={row['D']:<3} N={row['N']:<5} {'causal' if row['causal'] else 'full':6} {row['mode']:6} " + " ".join(
        f"{name}={_cell(row.get(name, {}))}" for name in chosen) + (f"  [{'; '.join(sites)}]" if sites else "")


def _ratio(row, a, b):
    ra, rb = row.get(a, {}), row.get(b, {})
    if "tflops" in ra and "tflops" in rb:
        return f"{ra['tflops'] / rb['tflops']:.2f}"
    return "—"


def markdown(rows, chosen, header) -> str:
    cols = " | ".join(chosen)
    out = [header, "", "TFLOP/s (higher is better), each variant's median round of the rounds in which the",
           "variants took turns; extra peak memory of one call in GiB; max relative error of flashfx",
           "against fp32 math attention; the spread of flashfx's rounds, (max − min) / median.", "",
           f"| D | N | mask | mode | {cols} | ffx/flash | ffx/cuDNN | ffx/flex | GiB ffx / flash | ffx err | ffx ±% |",
           "|" + "---|" * (len(chosen) + 10)]
    for r in rows:
        cells = " | ".join(_cell(r.get(n, {})) for n in chosen)
        f, fl = r.get("flashfx", {}), r.get("flash", {})
        mem = f"{f['extra_gib']:.2f} / {fl['extra_gib']:.2f}" if "extra_gib" in f and "extra_gib" in fl else "—"
        err = f"{max(f['errors'].values()):.1e}" if "errors" in f else "—"
        out.append(f"| {r['D']} | {r['N']} | {'causal' if r['causal'] else 'none'} | {r['mode']} | {cells} | "
                   f"{_ratio(r, 'flashfx', 'flash')} | {_ratio(r, 'flashfx', 'cudnn')} | {_ratio(r, 'flashfx', 'flex')} | {mem} | {err} | "
                   f"{plots.spread(f.get('tflops_rounds'))} |")
    return "\n".join(out) + "\n"


TABLE_BEGIN, TABLE_END = "<!-- generated: benchmarks/attention.py -->", "<!-- end generated -->"


def write_doc(path: str, md: str) -> None:
    """docs/benchmarks.md gets the new header and table between its markers; the notes written
    around them by hand (readings of the table, other benchmarks) stay. A file without the
    markers is written whole, markers included."""
    block = f"{TABLE_BEGIN}\n{md.rstrip()}\n{TABLE_END}\n"
    old = open(path).read() if os.path.exists(path) else ""
    if TABLE_BEGIN in old and TABLE_END in old:
        head, rest = old.split(TABLE_BEGIN, 1)
        block = head + block + rest.split(TABLE_END, 1)[1].removeprefix("\n")
    with open(path, "w") as f:
        f.write(block)


def plot(rows, chosen, path, env=None):
    plt = plots.pyplot()
    if plt is None:
        return
    modes = sorted({r["mode"] for r in rows}, key=["fwd", "fwdbwd"].index)
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        plots.grouped_bars(ax, [f"D{r['D']} N{r['N']}\n{'causal' if r['causal'] else 'full'}" for r in sub],
                           {name: [r.get(name, {}).get("tflops", 0) for r in sub] for name in chosen})
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"attention {mode}, bf16")
        ax.legend(ncol=len(chosen), fontsize=8)
    if env:
        fig.suptitle(env, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--shapes", default=None, help="only these D:N pairs, e.g. 128:1024,64:4096")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"of {','.join(VARIANTS)}; flashfx-tuned is flashfx with options={{'autotune': True}}")
    p.add_argument("--backend", default="flashfx", help="compiler for the naive form (flashfx, inductor)")
    p.add_argument("--eager-cap-gib", type=float, default=48.0, help="skip eager beyond this N×N memory")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--partial", default=None, help="rewrite this JSON file after every row")
    p.add_argument("--rounds", type=int, default=3, help="turns each variant is timed in (see Timing)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench's measuring time a round")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU; none found.")
        return 0
    import triton

    import flashfx  # noqa: F401  (an installed flashfx needs no import; a source tree does)

    rows, chosen = run(args)
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")
    os.makedirs(out_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    header = (f"# Attention benchmark\n\n{gpu}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
              f"{datetime.date.today().isoformat()}; `python benchmarks/attention.py`.\n\n"
              f"Shapes: B·N = 16384 tokens, H·D = 2048, bf16; flashfx compiles the naive form "
              f"(`softmax(q @ kᵀ · scale [masked_fill(triu, -inf)]) @ v`).")
    md = markdown(rows, chosen, header)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)
    plot(rows, chosen, os.path.join(out_dir, "attention.png"), plots.env_line(gpu, torch.__version__, triton.__version__))
    with open(os.path.join(out_dir, "benchmarks.md"), "w") as f:
        f.write(md)
    if not args.no_doc and not args.quick:
        write_doc(os.path.join(ROOT, "docs", "benchmarks.md"), md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
