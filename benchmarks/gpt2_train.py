"""End-to-end training step of GPT-2 small (124M): eager, inductor, inductor with SDPA, flashfx.

    PYTHONPATH=. python3 benchmarks/gpt2_train.py                      # seq 4096 and 1024, on a GPU
    PYTHONPATH=. python3 benchmarks/gpt2_train.py --device cpu --layers 2 --seqs 128 --out-dir /tmp/g

The model is benchmarks/gpt2.py, attention written by hand with a causal tril buffer as
nanoGPT writes it. Variants, each a fresh model from the same seed after torch._dynamo.reset():

    eager          the naive model, uncompiled
    inductor       torch.compile(model) of the naive model
    inductor-sdpa  torch.compile(model) with attention switched to SDPA(is_causal=True)
    flashfx        torch.compile(model, backend="flashfx") of the naive model

and, asked for by --variants, the last two with mode="reduce-overhead" (CUDA graphs):
inductor-sdpa-cudagraphs and flashfx-cudagraphs.

A step is what a user's loop does: forward under bf16 autocast (fp32 master weights), cross
entropy, backward, fused AdamW step, zero_grad. Batches hold the same number of tokens at every
sequence length (--batch-tokens / seq rows of random token ids). Timing: every variant of a
length is compiled and warmed up (--warmup steps, the first compiles), then their --windows
windows of --steps steps each between CUDA events take turns, and each variant's median
window is reported (the table's "± %" is the windows' spread, (max − min) / median). Taking
turns puts a slow spell of the host on every variant alike; --sequential times one variant
after another instead. Peak memory is the variant's own: what --steps more steps allocate at
most (max_memory_allocated) beyond what was allocated before them, plus the storages the variant
keeps between steps (weights, buffers, AdamW state, its batch), so other variants alive alongside
do not count. Under CUDA graphs the graphs' memory pool is allocated before the steps and is
missed. Before timing flashfx the script prints `flashfx.explain` and checks that every
attention site is fused; it also checks that every variant's first-step loss agrees with the
first variant's.

Writes a table, JSON, docs/gpt2_train.md and a plot docs/gpt2_train.png (copies under $OUT when
set); with --out-dir, or on CPU, everything goes to that folder ($OUT or benchmarks/out) instead.
--profile N profiles N more steps of each variant after timing (where the host's and the GPU's
time goes), printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import plots  # noqa: E402
from benchmarks.gpt2 import GPT, GPTConfig  # noqa: E402

DEFAULT_VARIANTS = ["eager", "inductor", "inductor-sdpa", "flashfx"]
VARIANTS = DEFAULT_VARIANTS + ["inductor-sdpa-cudagraphs", "flashfx-cudagraphs"]  # table order
CUDAGRAPHS = "-cudagraphs"
LOSS_RTOL = 2e-2  # first-step losses under bf16 autocast: ~ln(50257) = 10.8, agree to ~1e-3


# ---- one variant -------------------------------------------------------------------------------


def build(variant: str, cfg: GPTConfig, device: str, seed: int):
    """A fresh model (same seed for every variant), what the loop calls, and fused AdamW."""
    torch.manual_seed(seed)
    attn = "sdpa" if variant.startswith("inductor-sdpa") else "naive"
    model = GPT(GPTConfig(**{**cfg.__dict__, "attn": attn})).to(device)
    model.train()
    mode = "reduce-overhead" if variant.endswith(CUDAGRAPHS) else None
    if variant == "eager":
        run = model
    elif variant.startswith("flashfx"):
        run = torch.compile(model, backend="flashfx", mode=mode)
    else:
        run = torch.compile(model, mode=mode)
    # nanoGPT's configure_optimizers: decay the matrices, not biases and LayerNorm gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device == "cuda")
    return model, run, opt


def make_batch(batch: int, seq: int, vocab: int, device: str, seed: int):
    """Random token ids (not zeros: an all-zero batch makes the embedding backward trivial)."""
    g = torch.Generator().manual_seed(seed + 1)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)  # x, y: [B, T]


def train_step(run, opt, x, y, autocast, graphs: bool = False):
    if graphs:  # CUDA graph replays: a new step may overwrite the last one's outputs
        torch.compiler.cudagraph_mark_step_begin()
    with autocast():
        _, loss = run(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().clone() if graphs else loss.detach()


def explain_flashfx(model, x, y, autocast) -> dict:
    """What flashfx finds in the model as the step calls it (no_grad: a trace, no activations kept)."""
    import flashfx

    with torch.no_grad(), autocast():
        report = flashfx.explain(model, x, y)
    text = str(report)
    print(text, flush=True)
    return {"fused": report.fused, "sites": len(report.sites), "graphs": report.graphs,
            "summary": text.splitlines()[0], "explain": text}


def own_bytes(model, opt, tensors=()) -> int:
    """Bytes of the storages a model and its optimizer hold (parameters, buffers, optimizer
    state) and of `tensors`, each storage counted once."""
    held = [*model.parameters(), *model.buffers(), *tensors,
            *(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))]
    storages = {}
    for t in held:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


class VariantRun:
    """One variant at one length, compiled and warmed up, ready for windows of timed steps."""

    def __init__(self, variant: str, cfg: GPTConfig, seq: int, batch: int, args):
        from torch._dynamo.utils import counters as dynamo_counters

        from flashfx.passes.pipeline import counters as flashfx_counters

        self.args, self.variant = args, variant
        device = args.device
        self.cuda = device == "cuda"
        bf16 = args.dtype == "bf16"
        self.autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
        self.graphs = variant.endswith(CUDAGRAPHS)
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

        row = self.row = {"seq": seq, "batch": batch, "variant": variant}
        if variant.startswith("flashfx"):
            model, _, _ = build("eager", cfg, device, args.seed)
            x, y = make_batch(batch, seq, cfg.vocab_size, device, args.seed)
            row["flashfx"] = explain_flashfx(model, x, y, self.autocast)
            row["all_fused"] = row["flashfx"]["fused"] == row["flashfx"]["sites"] == cfg.n_layer
            if not row["all_fused"]:
                print(f"flashfx fused {row['flashfx']['fused']} of {row['flashfx']['sites']} sites; "
                      f"the model has {cfg.n_layer}", flush=True)
            del model, x, y
            gc.collect()
        self.x, self.y = make_batch(batch, seq, cfg.vocab_size, device, args.seed)

        rewritten0 = flashfx_counters["rewritten"]
        sdpa_rewrites0 = dynamo_counters["inductor"]["fuse_attention"]
        self.model, self.run, self.opt = build(variant, cfg, device, args.seed)
        t0 = time.perf_counter()
        self.losses = [self.step().item()]  # the first step compiles
        row["first_step_s"] = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            self.losses.append(self.step().item())
        self.sync()
        # what the variant keeps between steps: its weights, buffers, AdamW state and batch. Not
        # the memory allocated since it was built: the first variant built also pays for what
        # the process allocates once for all of them (0.5 GiB on the H200)
        self.resident = own_bytes(self.model, self.opt, (self.x, self.y)) if self.cuda else 0
        self.windows: list[tuple[float, float]] = []
        self.timed: list[torch.Tensor] = []
        if variant.startswith("flashfx"):
            row["rewritten"] = flashfx_counters["rewritten"] - rewritten0
        row["inductor_sdpa_rewrites"] = dynamo_counters["inductor"]["fuse_attention"] - sdpa_rewrites0

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def step(self):
        return train_step(self.run, self.opt, self.x, self.y, self.autocast, self.graphs)

    def window(self) -> None:
        """--steps steps between CUDA events: GPU time a step, and the host's time to enqueue them
        (close to the step time when the step is host-bound)."""
        steps, cuda = self.args.steps, self.cuda
        self.sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        self.timed += [self.step() for _ in range(steps)]
        host_ms = (time.perf_counter() - t0) * 1e3 / steps
        if cuda:
            end.record()
        self.sync()
        ms = (start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3) / steps
        self.windows.append((ms, host_ms))

    def finish(self) -> dict:
        """The row: median window, losses, peak memory over --steps more steps (the variant's own:
        what the step adds to what is allocated, plus what the variant keeps), profile."""
        args, row = self.args, self.row
        ms, host_ms = sorted(self.windows)[len(self.windows) // 2]
        losses = self.losses + [t.item() for t in self.timed]
        row.update(ms=ms, host_ms=host_ms, tokens_per_s=row["batch"] * row["seq"] / ms * 1e3,
                   first_loss=losses[0], last_loss=losses[-1], ms_windows=[w[0] for w in self.windows],
                   host_ms_windows=[w[1] for w in self.windows])
        if self.cuda:
            self.sync()
            base = self.allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                self.step()
            self.sync()
            added = torch.cuda.max_memory_allocated() - base
            row.update(peak_gib=(added + self.resident) / 2**30, resident_gib=self.resident / 2**30,
                       step_added_gib=added / 2**30)
        if getattr(args, "profile", 0):
            try:  # the measurement above stands whatever the profiler does
                row["profile"] = profile_steps(self.step, args.profile, self.cuda)
            except Exception as e:  # noqa: BLE001
                row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row


def measure(variant: str, cfg: GPTConfig, seq: int, batch: int, args) -> dict:
    """Train `variant` for warmup + windows × steps steps at [batch, seq]; tokens/s, peak memory, losses."""
    torch._dynamo.reset()
    vrun = VariantRun(variant, cfg, seq, batch, args)
    for _ in range(args.windows):
        vrun.window()
    return vrun.finish()


def profile_steps(step, n: int, cuda: bool, rows: int = 20) -> dict:
    """`n` more steps under torch.profiler, per step: where the host's time goes (operators and
    CUDA runtime calls by self CPU time: a cudaMalloc, cudaFree or synchronize shows here) and,
    on a GPU, the kernels by GPU time. Tables as torch.profiler prints them, and per-step
    totals."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    events = prof.key_averages()
    out = {"steps": n, "host": events.table(sort_by="self_cpu_time_total", row_limit=rows),
           "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / n}
    if cuda:
        gpu_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        out["gpu"] = events.table(sort_by=gpu_key, row_limit=rows)
        out["gpu_ms_per_step"] = sum(getattr(e, gpu_key) for e in events) / 1e3 / n
    return out


def _failed(variant, seq, batch, e: Exception) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    return {"seq": seq, "batch": batch, "variant": variant, "oom" if oom else "error": f"{type(e).__name__}: {str(e)[:300]}"}


def _release(args) -> None:
    gc.collect()  # a failure's traceback (and the variants' models) are gone by now
    torch._dynamo.reset()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def run_variant(variant, cfg, seq, batch, args) -> dict:
    """measure(), with an out-of-memory or any other failure recorded instead of raised."""
    try:
        row = measure(variant, cfg, seq, batch, args)
    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest
        row = _failed(variant, seq, batch, e)
    _release(args)
    return row


def run_interleaved(variants, cfg, seq, batch, args) -> list[dict]:
    """Every variant compiled and warmed up first, then their windows in turns (window w starts
    at variant w mod n): a slow spell of the host, or one that grows over the process's life,
    falls on every variant alike instead of on whichever ran later."""
    torch._dynamo.reset()
    runs, rows = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        try:
            runs[variant] = VariantRun(variant, cfg, seq, batch, args)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest
            rows[variant] = _failed(variant, seq, batch, e)
            gc.collect()
        (runs[variant].row if variant in runs else rows[variant])["wall_s"] = time.perf_counter() - t0
    order = list(runs)
    for w in range(args.windows):
        for variant in order[w % len(order):] + order[:w % len(order)] if order else ():
            if variant in rows:
                continue
            try:
                runs[variant].window()
            except Exception as e:  # noqa: BLE001
                rows[variant] = _failed(variant, seq, batch, e)
    for variant, vrun in runs.items():
        if variant not in rows:
            try:
                rows[variant] = vrun.finish()
            except Exception as e:  # noqa: BLE001
                rows[variant] = _failed(variant, seq, batch, e)
    runs.clear()
    _release(args)
    return [rows[v] for v in variants]


def run_all(args) -> list[dict]:
    cfg = GPTConfig(block_size=max(args.seqs), n_layer=args.layers)
    rows = []
    for seq in args.seqs:
        batch = max(1, args.batch_tokens // seq)
        if args.sequential:
            group = []
            for variant in args.variants:
                t0 = time.perf_counter()
                row = run_variant(variant, cfg, seq, batch, args)
                row["wall_s"] = time.perf_counter() - t0
                group.append(row)
                _report(row, rows + group, args)
        else:
            group = run_interleaved(args.variants, cfg, seq, batch, args)
            for row in group:
                _report(row, rows + group, args)
        rows += group
    check_losses(rows)
    return rows


def _report(row, rows, args) -> None:
    print(row_text(row), flush=True)
    if "profile" in row:
        prof = row["profile"]
        print(f"profile of {row['variant']} at seq {row['seq']}, {prof['steps']} steps: host (self CPU) "
              f"{prof['host_ms_per_step']:.1f} ms a step\n{prof['host']}", flush=True)
        if "gpu" in prof:
            print(f"GPU {prof['gpu_ms_per_step']:.1f} ms a step\n{prof['gpu']}", flush=True)
    if args.partial:  # keep what is measured so far if the run is cut short
        with open(args.partial, "w") as f:
            json.dump(rows, f, indent=1)


def check_losses(rows) -> None:
    """Every variant's first-step loss against the first measured variant's, per sequence length."""
    for seq in {r["seq"] for r in rows}:
        done = [r for r in rows if r["seq"] == seq and "first_loss" in r]
        for r in done:
            ref = done[0]
            r["loss_ref"] = ref["variant"]
            r["loss_rel_diff"] = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
            r["loss_ok"] = r["loss_rel_diff"] <= LOSS_RTOL


# ---- reporting ---------------------------------------------------------------------------------


def _find(rows, seq, variant):
    return next((r for r in rows if r["seq"] == seq and r["variant"] == variant), {})


def _ratio(rows, r, variant) -> str:
    other = _find(rows, r["seq"], variant)
    if "tokens_per_s" in r and "tokens_per_s" in other:
        return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}"
    return "—"


def _status(r) -> str:
    return "OOM" if "oom" in r else "error" if "error" in r else ""


def row_text(r) -> str:
    if "tokens_per_s" not in r:
        return f"seq {r['seq']:5} {r['variant']:14} {_status(r)}: {r.get('oom') or r.get('error')}"
    peak = f"  peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
    windows = "/".join(f"{w:.1f}" for w in r.get("ms_windows", ()))
    return (f"seq {r['seq']:5} {r['variant']:14} {r['tokens_per_s']:10.0f} tok/s  {r['ms']:8.1f} ms/step"
            f" (windows {windows}){peak}"
            f"  loss {r['first_loss']:.4f}  (first step {r['first_step_s']:.1f} s, {r.get('wall_s', 0):.0f} s)")


def table(rows) -> list[str]:
    """seq, variant, tokens/s, ratios, peak GiB and loss: markdown, also printed as is."""
    out = ["| seq | batch | variant | tokens/s | × inductor-sdpa | × eager | ms/step | ± % | host ms/step | peak GiB | "
           "peak − sdpa MiB | first loss | loss Δ |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq"], VARIANTS.index(r["variant"]))):
        if "tokens_per_s" not in r:
            out.append(f"| {r['seq']} | {r['batch']} | {r['variant']} | {_status(r)} | — | — | — | — | — | — | — | — | — |")
            continue
        host = f"{r['host_ms']:.1f}" if "host_ms" in r else "—"
        peak = f"{r['peak_gib']:.3f}" if "peak_gib" in r else "—"
        sdpa = _find(rows, r["seq"], "inductor-sdpa")
        # the peak against the SDPA model's, in MiB: a few MiB hide in the GiB column
        dpeak = f"{(r['peak_gib'] - sdpa['peak_gib']) * 1024:+.1f}" if "peak_gib" in r and "peak_gib" in sdpa else "—"
        diff = f"{r['loss_rel_diff']:.1e}" + ("" if r.get("loss_ok", True) else " ✗") if "loss_rel_diff" in r else "—"
        out.append(f"| {r['seq']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
                   f"{_ratio(rows, r, 'inductor-sdpa')} | {_ratio(rows, r, 'eager')} | {r['ms']:.1f} | {plots.spread(r.get('ms_windows'))} | {host} | "
                   f"{peak} | {dpeak} | {r['first_loss']:.4f} | {diff} |")
    return out


def environment(device: str) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": device,
           "date": datetime.date.today().isoformat()}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        import platform

        env.update(gpu=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return env


def _command_args(argv: list[str]) -> list[str]:
    """The command's arguments as the report gives them: without where this run wrote its files."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out-dir", "--partial"):
            skip = True
        elif a != "--no-doc" and not a.startswith(("--out-dir=", "--partial=")):
            out.append(a)
    return out


def markdown(rows, env, args, cfg_line: str) -> str:
    ffx = [r for r in rows if r["variant"].startswith("flashfx") and "flashfx" in r]
    fused = "; ".join(f"seq {r['seq']} {r['variant']}: {r['flashfx']['summary'].removeprefix('flashfx: ')}, "
                      f"{r.get('rewritten', '—')} rewritten in the compiled step" for r in ffx)
    bad = [r for r in rows if r.get("loss_ok") is False]
    loss = (f"First-step losses agree within {LOSS_RTOL:g} (relative) of the first variant's at each "
            f"length." if not bad else
            "First-step losses DISAGREE: " + ", ".join(f"seq {r['seq']} {r['variant']}" for r in bad) + ".")
    sdpa = [f"seq {r['seq']} {r['variant']}: {r['inductor_sdpa_rewrites']}" for r in rows if "inductor_sdpa_rewrites" in r]
    lines = [
        "## End-to-end training: GPT-2 small",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f"; {env['date']}; "
        f"`{' '.join(['PYTHONPATH=. python3 benchmarks/gpt2_train.py'] + _command_args(sys.argv[1:]))}`.",
        "",
        f"{cfg_line} A step: forward under bf16 autocast with fp32 weights, cross entropy, backward, "
        f"fused AdamW, zero_grad; {args.warmup} warm-up step{'s' if args.warmup > 1 else ''} (the first compiles), then "
        f"{args.windows} windows of {args.steps} timed steps, the median window's mean step reported (± %: the "
        f"windows' spread, (max − min) / median). "
        + ("Variants ran one after another. " if getattr(args, "sequential", True) else
           "All variants of a length were compiled first; then their windows took turns. ")
        + "Host ms/step: the time the host took to enqueue those steps; when it "
        f"is close to ms/step, the step is host-bound. Peak: max_memory_allocated over {args.steps} more steps, "
        f"less what was allocated before them, plus the storages the variant keeps between steps (weights, "
        f"buffers, AdamW state, batch): the variant's own peak. Every variant is a fresh model from the same seed.",
        "",
        "- **eager**: the model as written (attention by hand: `q @ kᵀ · scale`, `masked_fill` from "
        "a tril buffer, softmax, `@ v`).",
        "- **inductor**: `torch.compile(model)` of the same model.",
        "- **inductor-sdpa**: `torch.compile(model)` with attention switched to "
        "`F.scaled_dot_product_attention(q, k, v, is_causal=True)`.",
        "- **flashfx**: `torch.compile(model, backend=\"flashfx\")` of the hand-written model.",
        "",
        *table(rows),
        "",
        f"flashfx: {fused or 'not run'}. {loss}",
    ]
    if sdpa:
        lines.append(f"Attention sites inductor's own pattern matcher rewrote to SDPA: {'; '.join(sdpa)}.")
    lines += ["", "Plot: `docs/gpt2_train.png`; raw results: `docs/gpt2_train.json`.", ""]
    return "\n".join(lines)


def plot(rows, path, title):
    plt = plots.pyplot()
    if plt is None:
        return
    seqs = sorted({r["seq"] for r in rows})
    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (thousands)"), (axes[1], "peak_gib", "peak GiB")):
        found = {name: [_find(rows, s, name) for s in seqs] for name in names}
        scale = 1e3 if key == "tokens_per_s" else 1
        _, bars = plots.grouped_bars(ax, [f"seq {s}" for s in seqs],
                                     {n: [r.get(key, 0) / scale for r in rs] for n, rs in found.items()})
        for name, rs in found.items():
            for bar, r in zip(bars[name], rs):
                if key not in r:
                    ax.annotate(_status(r) or "—", (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                                va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, env, args, cfg_line):
    """JSON, markdown and plot: to --out-dir if given (or on CPU), else docs/ plus copies under $OUT."""
    md = markdown(rows, env, args, cfg_line)
    result = {**env, "config": cfg_line, "args": vars(args), "rows": rows}
    title = f"GPT-2 small training step, {env['gpu']}, torch {env['torch']}"
    docs = args.device == "cuda" and not args.out_dir and not args.no_doc
    dirs = [args.out_dir or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")]
    if docs:
        dirs = [os.path.join(ROOT, "docs")] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gpt2_train.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(d, "gpt2_train.md"), "w") as f:
            f.write(md)
        plot(rows, os.path.join(d, "gpt2_train.png"), title)
    print(f"\nwrote gpt2_train.json, .md, .png under {', '.join(dirs)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="4096,1024", help="sequence lengths, run in this order (4096 first: "
                   "the length that matters most is measured even if a run is cut short)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step; batch = this // seq (default 8192 on CUDA: 8×1024, 2×4096; 256 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps a window")
    p.add_argument("--windows", type=int, default=3, help="windows of timed steps; the median one is reported")
    p.add_argument("--sequential", action="store_true",
                   help="compile and time one variant after another (default: all compiled first, then "
                        "their windows in turns)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"some of {','.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=12, help="n_layer (fewer for quick runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype (fp32: no autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="write JSON, markdown and plot here, not to docs/")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/ (results go to $OUT or benchmarks/out)")
    p.add_argument("--partial", default=None, help="rewrite this JSON file after every variant")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps of each variant (torch.profiler): host time by "
                        "operator and CUDA call, kernels by GPU time; printed and kept in the JSON")
    args = p.parse_args(argv)
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    args.batch_tokens = args.batch_tokens or (8192 if args.device == "cuda" else 256)
    args.warmup = max(args.warmup, 1)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU found; pass --device cpu for a quick run (its times mean nothing)")
            return 1
        torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT: fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True

    import flashfx  # noqa: F401  (registers backend="flashfx" when running from a source tree)

    env = environment(args.device)
    cfg = GPTConfig(block_size=max(args.seqs), n_layer=args.layers)
    with torch.device("meta"):  # count parameters without allocating them
        n_params = GPT(cfg).num_params()
    cfg_line = (f"GPT-2 small: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, vocab "
                f"{cfg.vocab_size}, block_size {cfg.block_size}, {n_params / 1e6:.0f}M parameters (tied "
                f"embeddings; wpe has block_size rows), dropout {cfg.dropout}; {args.batch_tokens} tokens a step, random ids.")
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}\n{cfg_line}\n", flush=True)

    t0 = time.perf_counter()
    rows = run_all(args)
    print(f"\n{cfg_line}  ({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(table(rows)))
    write(rows, env, args, cfg_line)

    problems = [f"seq {r['seq']}: flashfx fused {r.get('flashfx', {}).get('fused')} of "
                f"{r.get('flashfx', {}).get('sites')} sites, rewrote {r.get('rewritten')}"
                for r in rows if r["variant"].startswith("flashfx") and r.get("all_fused") is False]
    problems += [f"seq {r['seq']} {r['variant']}: first loss {r['first_loss']:.4f} vs {r['loss_ref']} "
                 f"(relative {r['loss_rel_diff']:.1e})" for r in rows if r.get("loss_ok") is False]
    problems += [f"seq {r['seq']} {r['variant']}: {r['error']}" for r in rows if "error" in r]
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
