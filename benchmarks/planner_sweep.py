"""The planner's untuned tiles against an exhaustive search, kernel by kernel, on one GPU.

    PYTHONPATH=. python3 benchmarks/planner_sweep.py                # 24 shapes, full grid
    PYTHONPATH=. python3 benchmarks/planner_sweep.py --grid small   # 16 configs a kernel: the fallback
    PYTHONPATH=. python3 benchmarks/planner_sweep.py --dry-run      # no GPU: shapes, grid sizes, plans (H200)
    PYTHONPATH=. python3 benchmarks/planner_sweep.py --ns 16384 --shapes 64:16384:mha,128:16384:mha,256:16384:mha \
        --out-dir $OUT --no-doc                                     # long sequences (docs/planner_sweep_long.json)
    PYTHONPATH=. python3 benchmarks/planner_sweep.py --tiny --out-dir /tmp/sweep   # CPU smoke run
    PYTHONPATH=. python3 benchmarks/planner_sweep.py --replan docs/planner_sweep.json  # after a refit

Acceptance: over 24 shapes the planner's choice reaches >= 95% (median) and >= 90% (minimum) of
the throughput of the best configuration the search finds, for the forward and for the backward
(dK/dV + dQ). Shapes: D in {64, 128, 256} x N in {1024, 4096} x (full, causal) x (H = Hk = 16,
or GQA H = 16, Hk = 4); B = 16384 // N; bf16, randn inputs; score program scale(D^-0.5), causal
top-left. The planner is called with the shape (N, causal, group, B·H) when it accepts them.

Grid, per kernel: block_m, block_n in {32, 64, 128}, warps in {4, 8}, stages {2, 3, 4} for the
forward and {1, 2, 3} for dK/dV and dQ; configs whose SRAM the cost model puts over the GPU's
per-block limit are skipped and counted (--sram-slack widens the limit); the planner's own
choice is always measured. --grid small: blocks {64, 128}, warps {4, 8}, stages {2, 3}.

Timing, each kernel alone: gpu.forward / gpu.backward run with their kernels swapped for
recorders, so the launch (grid, arguments, constexprs) is exactly the runtime's; that one launch
is replayed between CUDA events. Why not events around a whole backward with one kernel's tiles
changed: the other kernel would sit inside every sample, adding their time
and noise to a difference we want to rank by. Before each rep the L2 is flushed (as do_bench
does) and the stream starts with a sleep kernel, so the host enqueues ahead of the GPU and no
launch gap falls between a pair of events. The median of --reps reps (after --warmup); a config
already --cut times slower than the best so far after 5 reps stops there (it cannot win).

Compiling is the risk: 12 kernel families (D, causal and the GQA group are constexprs, N is
not) x ~160 configs is ~1600 Triton compiles of 1-7 s each. A spawn pool of --jobs workers
compiles every (family, kernel, config) with JITFunction.warmup on tiny tensors that specialise
like the real ones (every integer a multiple of 16, unit last stride), filling Triton's on-disk
cache without launching anything; the main process times each (family, kernel) as soon as its
compiles are done, reading binaries from the cache, while the workers go on with the next.
The workers also report each binary's shared memory, registers and spills.

Writes planner_sweep.json/.md/.png to docs/ on CUDA (copies under $OUT when set), or to
--out-dir; rewrites a partial JSON after every (family, kernel) under --out-dir, $OUT or
benchmarks/out, and stops timing at --budget-s so that a run cut short still reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KERNELS = ("fwd", "dkdv", "dq")
TRITON_NAME = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
TOKENS = 16384  # B·N of every shape
TINY_TOKENS = 32
COMPILE_N = 128  # rows of the workers' tensors: a multiple of 16, as every real N is
MIN_CUT_REPS = 5
MAX_ERROR = 2e-2  # normwise, against fp32: bf16 kernels land near 4e-3; a broken tile far above
# seconds to compile one config on one core (sm90, bf16, causal GQA; Triton 3.9 on a server CPU):
# what --dry-run's estimate uses
EST_COMPILE_S = {64: {"fwd": 1.3, "dkdv": 2.6, "dq": 1.9},
                 128: {"fwd": 1.6, "dkdv": 3.3, "dq": 1.8},
                 256: {"fwd": 2.9, "dkdv": 4.6, "dq": 3.3}}
DEFAULT_JOBS = 14

Config = tuple  # (block_m, block_n, num_warps, num_stages)


@dataclass(frozen=True)
class Shape:
    D: int
    N: int
    B: int
    H: int
    Hk: int
    causal: bool

    @property
    def group(self) -> int:
        return self.H // self.Hk

    @property
    def family(self) -> "Family":
        return Family(self.D, self.causal, self.H, self.Hk)

    @property
    def label(self) -> str:
        heads = f"GQA{self.group}" if self.group > 1 else "MHA"
        return f"D={self.D} N={self.N} {'causal' if self.causal else 'full'} {heads}"


@dataclass(frozen=True)
class Family:
    """What one compiled binary serves: D, causal and the GQA group are constexprs; N is not."""

    D: int
    causal: bool
    H: int
    Hk: int

    @property
    def label(self) -> str:
        heads = f"gqa{self.H // self.Hk}" if self.H != self.Hk else "mha"
        return f"d{self.D}-{'causal' if self.causal else 'full'}-{heads}"


def all_shapes(tiny: bool = False, ns: tuple[int, ...] = (1024, 4096)) -> list[Shape]:
    """The acceptance shapes; `ns` other sequence lengths (B = 16384 // N as before)."""
    if tiny:  # the interpreter: one small N, two heads
        return [Shape(16, TINY_TOKENS, 1, 2, hk, c) for c in (False, True) for hk in (2, 1)]
    return [Shape(D, N, TOKENS // N, 16, hk, c)
            for c in (False, True) for hk in (16, 4) for D in (64, 128, 256) for N in ns]


def _ns(args) -> tuple[int, ...]:
    return tuple(int(n) for n in args.ns.split(","))


def select(shapes: list[Shape], shape_filter: str | None, family_filter: str | None) -> list[Shape]:
    """--shapes D:N[:full|causal][:mha|gqa], comma-separated; --families label parts, e.g.
    d128 (every D=128 family), causal-gqa4, d64-full-mha."""
    if shape_filter:
        def match(s, tok):
            parts = tok.split(":")
            ok = int(parts[0]) == s.D and (len(parts) < 2 or int(parts[1]) == s.N)
            for p in parts[2:]:
                ok &= {"full": not s.causal, "causal": s.causal, "mha": s.group == 1, "gqa": s.group > 1}[p]
            return ok
        shapes = [s for s in shapes if any(match(s, t) for t in shape_filter.split(","))]
    if family_filter:
        toks = [set(t.split("-")) for t in family_filter.split(",")]
        shapes = [s for s in shapes if any(t <= set(s.family.label.split("-")) for t in toks)]
    return shapes


def grid(kernel: str, size: str) -> list[Config]:
    """The configs searched: tile shapes the kernels compute correctly with (the planner's
    `_sound`: 8 warps need 128-row dots); every timed config's output is checked as well."""
    from flashfx.planner.plan import _sound

    if size == "tiny":  # two configs, for the interpreter
        return [(16, 16, 4, 1), (32, 16, 4, 2)]
    if size == "small":
        configs = itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
    else:
        stages = (2, 3, 4) if kernel == "fwd" else (1, 2, 3)
        configs = itertools.product((32, 64, 128), (32, 64, 128), (4, 8), stages)
    out = [c for c in configs if _sound(kernel, *c[:3])]
    if kernel == "dkdv" and size == "full":  # keys down the rows: (bm, bn, warps, stages, True)
        from flashfx.planner import hardware
        from flashfx.planner.plan import _legal

        h200 = hardware.KNOWN["H200"]
        out += [(*c, True) for c in itertools.product((16, 32, 64, 128), (64, 128), (4, 8), (2, 3))
                if _sound(kernel, *c[:3], True) and _legal(kernel, h200, *c[:3], True)]
    return out


def cfg_text(c: Config | None) -> str:
    return (f"{c[0]}x{c[1]} w{c[2]} s{c[3]}" + (" kd" if _down(c) else "")) if c else "—"


def _down(c) -> bool:
    """Whether config `c` has dK/dV's tiles keys down the rows (a fifth element, True)."""
    return len(c) > 4 and bool(c[4])


# ---- the planner and its cost model -------------------------------------------------------------


def planner_plan(shape: Shape, gpu, elt: int, interpret: bool):
    """The planner's TilePlan for this exact call, and the shape keywords it accepted."""
    from flashfx.planner.plan import plan

    if interpret:
        return plan(shape.D, elt, gpu, interpret=True), []
    params = inspect.signature(plan).parameters
    kw = dict(n_q=shape.N, n_k=shape.N, causal=shape.causal, group=shape.group, batch_heads=shape.B * shape.H)
    kw = {k: v for k, v in kw.items() if k in params}
    return plan(shape.D, elt, gpu, **kw), sorted(kw)


def tiles_of(tp, kernel: str) -> Config:
    t = {"fwd": tp.fwd, "dkdv": tp.bwd_dkdv, "dq": tp.bwd_dq}[kernel]
    return (t.block_m, t.block_n, t.num_warps, t.num_stages) + ((True,) if t.keys_down else ())


def with_tiles(tp, kernel: str, cfg: Config):
    """`tp` with one kernel's tiles replaced."""
    from flashfx.planner.plan import KernelTiles

    t = KernelTiles(block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3], sram_bytes=0,
                    **({"keys_down": True} if _down(cfg) else {}))
    field = {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}[kernel]
    return dataclasses.replace(tp, **{field: t})


_model_warned = []


def model(kernel: str, shape: Shape, gpu, elt: int, cfg: Config):
    """The cost model's prediction for one config (None if the model's API is not there)."""
    try:
        from flashfx.planner import cost
        from flashfx.planner.plan import _pow2_at_least

        s = cost.Shape(n_q=shape.N, n_k=shape.N, head_dim=_pow2_at_least(shape.D), elt=elt,
                       causal=shape.causal, group=shape.group, batch_heads=shape.B * shape.H)
        return cost.predict(kernel, s, gpu, *cfg[:4], **({"keys_down": True} if _down(cfg) else {}))
    except Exception as e:  # noqa: BLE001 - the sweep measures without the model, and says so
        if not _model_warned:
            _model_warned.append(1)
            print(f"  (no cost-model predictions: {type(e).__name__}: {e})", flush=True)
        return None


def candidates(shapes: list[Shape], kernel: str, gpu, elt: int, size: str, slack: float, plans: dict):
    """(configs to compile for this family and kernel, configs skipped for SRAM): the grid, less
    what the cost model puts over the SRAM limit, plus every planner choice of the family."""
    keep, skipped = [], []
    for cfg in grid(kernel, size):
        sram = [getattr(model(kernel, s, gpu, elt, cfg), "sram_bytes", 0) for s in shapes]
        (skipped if max(sram) > slack * gpu.smem_per_block else keep).append(cfg)
    for s in shapes:
        mine = tiles_of(plans[s], kernel)
        if mine not in keep:
            keep.insert(0, mine)
        if mine in skipped:
            skipped.remove(mine)
    return keep, skipped


# ---- recording the runtime's launches -----------------------------------------------------------


@dataclass
class Launch:
    fn: object  # the Triton kernel (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        return self.fn[self.grid](*self.args, **self.kwargs)

    def warmup(self):
        """Compile (or read from Triton's cache) without launching."""
        return self.fn.warmup(*self.args, grid=self.grid, **self.kwargs)


class _Recorder:
    """Stands in for a kernel: `[grid](...)` records the launch; anything else the runtime asks
    of the kernel (its `arg_names`, to place tensor descriptors) is the kernel's."""

    def __init__(self, fn, into: dict, name: str):
        self.fn, self.into, self.name = fn, into, name

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.into[self.name] = Launch(self.fn, grid, args, kwargs)
        return record


@contextmanager
def recording(module, names):
    """Within the block, `module.<name>[grid](...)` records the launch instead of running it."""
    launches, saved = {}, {n: getattr(module, n) for n in names}
    for n, fn in saved.items():
        setattr(module, n, _Recorder(fn, launches, n))
    try:
        yield launches
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def program_for(shape: Shape):
    from flashfx.ir import ScoreOp, ScoreProgram

    return ScoreProgram((ScoreOp("scale", None, shape.D ** -0.5),), "top_left" if shape.causal else None)


class Case:
    """One shape's tensors, and the runtime's launch of any kernel with any tiles.

    run_forward=False (the compile workers): nothing is launched, not even randn, so a worker
    never puts work on the GPU the main process is timing."""

    def __init__(self, shape: Shape, base_plan, device: str, dtype, run_forward: bool = True):
        import torch

        from flashfx.codegen import attention as codegen
        from flashfx.runtime import gpu

        self.shape, self.base, self.gpu = shape, base_plan, gpu
        self._ref = None
        self.program = program_for(shape)
        self.module = codegen.load(self.program.encode())
        B, H, Hk, N, D = shape.B, shape.H, shape.Hk, shape.N, shape.D
        # q, dout: [B, H, N, D]; k, v: [B, Hk, N, D]
        if run_forward:
            g = torch.Generator(device=device).manual_seed(0)
            make = lambda h: torch.randn(B, h, N, D, device=device, dtype=dtype, generator=g)  # noqa: E731
        else:
            make = lambda h: torch.empty(B, h, N, D, device=device, dtype=dtype)  # noqa: E731
        self.q, self.k, self.v, self.dout = make(H), make(Hk), make(Hk), make(H)
        if run_forward:
            self.out, self.stats = gpu.forward(self.q, self.k, self.v, [], self.program, tiles=base_plan)
        else:
            self.out = torch.empty_like(self.q)
            self.stats = torch.empty((self.program.stats_planes, B, H, N), device=device, dtype=torch.float32)

    def error(self, kernel: str, launch: Launch) -> float:
        """Normwise relative error of what `launch` wrote against an fp32 reference (SDPA on
        fp32 copies, autograd for the gradients): a config that computes wrong loses."""
        import torch

        if self._ref is None:
            q, k, v = (t.float().requires_grad_() for t in (self.q, self.k, self.v))
            g = self.shape.group
            kk, vv = (t.repeat_interleave(g, 1) for t in (k, v)) if g > 1 else (k, v)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, kk, vv, is_causal=self.shape.causal, scale=self.shape.D ** -0.5)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), self.dout.float())
            self._ref = {"fwd": [out.detach()], "dkdv": [dk, dv], "dq": [dq]}
        got = {"fwd": [launch.args[3]], "dkdv": [launch.args[6], launch.args[7]], "dq": [launch.args[7]]}[kernel]
        return max(float((a.float() - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, self._ref[kernel]))

    def launch(self, kernel: str, cfg: Config) -> tuple[Launch, list[Launch]]:
        """(the launch of `kernel` with tiles `cfg`, launches to run once before timing it)."""
        tiles = with_tiles(self.base, kernel, cfg)
        if kernel == "fwd":
            with recording(self.module, ["_attn_fwd"]) as rec:
                self.gpu.forward(self.q, self.k, self.v, [], self.program, tiles=tiles)
            return rec["_attn_fwd"], []
        with recording(self.module, ["_attn_bwd_dkdv", "_attn_bwd_dq"]) as rec:
            self.gpu.backward(self.dout, self.q, self.k, self.v, self.out, self.stats, [], self.program, tiles=tiles)
        # the backward allocates its row-term buffer afresh, and dQ fills it: before dK/dV reads it
        return rec[TRITON_NAME[kernel]], ([rec["_attn_bwd_dq"]] if kernel == "dkdv" else [])


# ---- compiling in a pool ------------------------------------------------------------------------

_worker_cases: dict = {}


def _worker_init():
    import torch

    try:
        os.nice(10)  # the main process keeps the CPU it needs to enqueue launches on time
    except OSError:
        pass
    torch.set_num_threads(1)


def compile_job(fam: Family, kernel: str, cfg: Config, n: int, dtype_name: str, interpret: bool) -> dict:
    """Compile one (family, kernel, config) into Triton's cache; report its resources.

    Under the interpreter there is nothing to compile: the launch runs once instead."""
    import torch

    from flashfx.planner import hardware

    t0 = time.time()
    key = (fam, n, dtype_name, interpret)
    try:
        if key not in _worker_cases:
            shape = Shape(fam.D, n, 1, fam.H, fam.Hk, fam.causal)
            dtype = getattr(torch, dtype_name)
            g = hardware.INTERPRETER if interpret else hardware.current()
            base, _ = planner_plan(shape, g, dtype.itemsize, interpret)
            device = "cpu" if interpret else "cuda"
            _worker_cases[key] = Case(shape, base, device, dtype, run_forward=interpret)
        case = _worker_cases[key]
        launch, prep = case.launch(kernel, cfg)
        if interpret:
            for p in prep:
                p()
            launch()
            return {"status": "ok", "compile_s": time.time() - t0}
        compiled = launch.warmup()
        info = {"status": "ok", "shared": getattr(getattr(compiled, "metadata", None), "shared", None)}
        try:
            compiled._init_handles()  # loads the binary (no launch): OutOfResources shows here
            info.update(regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))
        except AttributeError:  # a Triton without this private method: the main process finds out
            pass
        except Exception as e:  # noqa: BLE001
            info.update(status=_failure(e), error=_first_line(e))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
        info = {"status": _failure(e), "error": _first_line(e)}
    info["compile_s"] = time.time() - t0
    return info


def collect(futures: dict, timeout: float) -> dict | None:
    """{config: compile report} once every future is done; None if `timeout` passes first."""
    from concurrent.futures import wait

    _, pending = wait(futures.values(), timeout=max(timeout, 0))
    if pending:
        return None
    out = {}
    for c, f in futures.items():
        try:
            out[c] = f.result()
        except Exception as e:  # noqa: BLE001 - a dead worker: the main process compiles it itself
            out[c] = {"status": "ok", "pool_error": _first_line(e)}
    return out


# ---- timing -------------------------------------------------------------------------------------


class Timer:
    """Median seconds of one launch: CUDA events on a GPU, wall clock under the interpreter."""

    def __init__(self, device: str, reps: int, warmup: int, cut: float):
        import torch

        self.torch, self.device = torch, device
        self.reps, self.warmup, self.cut = reps, warmup, cut
        if device == "cuda":
            self.flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")  # > L2
            khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 0) or 1_800_000
            self.prime = int(1e-3 * khz * 1e3)  # cycles: ~1 ms of sleep

    def _batch(self, run, n) -> list[float]:
        torch = self.torch
        if n <= 0:
            return []
        if self.device != "cuda":
            out = []
            for _ in range(n):
                t = time.perf_counter()
                run()
                out.append(time.perf_counter() - t)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda._sleep(self.prime)  # the host runs ahead of the GPU from here on
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]

    def __call__(self, run, best: float | None) -> tuple[float, int, bool]:
        """(median seconds, reps, cut short): stops after MIN_CUT_REPS if already > cut x best."""
        for _ in range(self.warmup):
            run()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        first = min(MIN_CUT_REPS, self.reps)
        times = self._batch(run, first)
        if first < self.reps and self.cut and best and statistics.median(times) > self.cut * best:
            return statistics.median(times), len(times), True
        times += self._batch(run, self.reps - first)
        return statistics.median(times), len(times), False


def time_unit(case: Case, kernel: str, configs: list[Config], compiled: dict, timer: Timer, gpu, elt) -> dict:
    """Every config of one kernel at one shape, the planner's first (it sets the bar for --cut),
    then the others in the model's order, so that the best so far tightens early."""
    shape = case.shape
    mine = tiles_of(case.base, kernel)
    pred = {c: model(kernel, shape, gpu, elt, c) for c in configs}
    order = [mine] + sorted((c for c in configs if c != mine),
                            key=lambda c: getattr(pred[c], "time_s", math.inf) or math.inf)
    rows, best = [], None
    for cfg in order:
        row = {"cfg": list(cfg), "pred_us": to_us(getattr(pred[cfg], "time_s", None))}
        info = compiled.get(cfg, {})
        row.update({k: info[k] for k in ("shared", "regs", "spills") if info.get(k) is not None})
        if info.get("status", "ok") != "ok":
            row.update(status=info["status"], error=info.get("error", ""))
            rows.append(row)
            continue
        try:
            launch, prep = case.launch(kernel, cfg)
            for p in prep:
                p()
            t0 = time.perf_counter()
            launch()  # the first launch loads the binary; seconds here mean it compiled instead
            if time.perf_counter() - t0 > 0.5:
                row["compiled_here"] = True
            t, n, cut = timer(launch, best)
            err = case.error(kernel, launch)
            row.update(status="ok" if err <= MAX_ERROR else "wrong", us=to_us(t), reps=n, cut=cut,
                       err=float(f"{err:.2e}"))
            if row["status"] == "ok":
                best = t if best is None else min(best, t)
        except Exception as e:  # noqa: BLE001 - a config that fails to run is counted, not fatal
            row.update(status=_failure(e), error=_first_line(e))
        rows.append(row)
    return {"planner": list(mine), "configs": rows}


def _failure(e: Exception) -> str:
    return "out_of_resources" if "OutOfResources" in type(e).__name__ or "out of resource" in str(e) else "error"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


# ---- results ------------------------------------------------------------------------------------


def kernel_result(unit: dict, tp, kernel: str) -> dict:
    """Planner and best of one kernel at one shape."""
    ok = [r for r in unit["configs"] if r.get("status") == "ok"]
    mine = next((r for r in unit["configs"] if r["cfg"] == unit["planner"]), None)
    untimed = mine is None  # a replayed sweep that never ran the planner's choice: no ratio
    if mine is None or mine.get("status") != "ok":  # or the choice failed or computed wrong: a miss
        mine = {}
    best = min(ok, key=lambda r: r["us"]) if ok else {}
    t = {"fwd": tp.fwd, "dkdv": tp.bwd_dkdv, "dq": tp.bwd_dq}[kernel]
    return {
        "planner": unit["planner"], "planner_us": mine.get("us"),
        "planner_pred_us": to_us(getattr(t, "time_s", None)) or None,  # 0: the plan has no prediction
        "planner_rank": 1 + sorted(r["us"] for r in ok).index(mine["us"]) if "us" in mine else None,
        "best": best.get("cfg"), "best_us": best.get("us"),
        "timed": len(ok), "cut": sum(1 for r in ok if r.get("cut")),
        "failed": sum(1 for r in unit["configs"] if r.get("status") not in ("ok", None)),
        "wrong": sum(1 for r in unit["configs"] if r.get("status") == "wrong"),
        "compiled_here": sum(1 for r in unit["configs"] if r.get("compiled_here")),
        **({"untimed": True} if untimed else {}),
    }


def ratio(best, planner):
    """Throughput of the planner's choice over the best's (best time / planner time)."""
    return best / planner if best and planner else None


def finish_row(row: dict) -> None:
    """Fill a shape's fwd / bwd ratios once its kernels are measured."""
    k = row["kernels"]
    for key in ("untimed", "fwd_ratio", "bwd_ratio", "bwd_planner_us", "bwd_best_us"):  # a replay's old ones
        row.pop(key, None)
    untimed = [n for n in KERNELS if k.get(n, {}).get("untimed")]
    if untimed:  # replayed: the sweep has no time for the planner's choice there
        row["untimed"] = untimed
    if "fwd" in k and "fwd" not in untimed:
        row["fwd_ratio"] = ratio(k["fwd"]["best_us"], k["fwd"]["planner_us"]) or 0.0
    if "dkdv" in k and "dq" in k and not {"dkdv", "dq"} & set(untimed):
        p = [k[n]["planner_us"] for n in ("dkdv", "dq")]
        b = [k[n]["best_us"] for n in ("dkdv", "dq")]
        row["bwd_planner_us"] = round(sum(p), 1) if all(p) else None
        row["bwd_best_us"] = round(sum(b), 1) if all(b) else None
        row["bwd_ratio"] = ratio(row["bwd_best_us"], row["bwd_planner_us"]) or 0.0


def summary(rows: list[dict], wanted: int) -> dict:
    out = {"shapes": len(rows), "shapes_wanted": wanted}
    for part in ("fwd", "bwd"):
        rs = [r[f"{part}_ratio"] for r in rows if f"{part}_ratio" in r]
        if rs:
            out[part] = {"n": len(rs), "median": statistics.median(rs), "min": min(rs),
                         "pass": statistics.median(rs) >= 0.95 and min(rs) >= 0.90}
    for kernel in KERNELS:  # per kernel: the planner's share of the best, and the model's time error
        ks = [r["kernels"][kernel] for r in rows if kernel in r["kernels"] and not r["kernels"][kernel].get("untimed")]
        rs = [ratio(k["best_us"], k["planner_us"]) or 0.0 for k in ks]
        err = [k["planner_pred_us"] / k["planner_us"] for k in ks if k["planner_pred_us"] and k["planner_us"]]
        if rs:
            out.setdefault("kernels", {})[kernel] = {
                "median": statistics.median(rs), "min": min(rs),
                "predicted_over_measured": statistics.median(err) if err else None}
    done = [r for r in rows if "fwd_ratio" in r and "bwd_ratio" in r]
    out["complete_shapes"] = len(done)
    untimed = [f"{r['label']} {n}" for r in rows for n in r.get("untimed", ())]
    if untimed:
        out["untimed"] = untimed
    out["accepted"] = (len(done) >= 24 and all(out.get(p, {}).get("pass") for p in ("fwd", "bwd")))
    return out


def to_us(seconds) -> float | None:
    return round(seconds * 1e6, 1) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else None


def _us(us) -> str:
    return f"{us:.0f}" if us else "—"


def _r(x) -> str:
    return f"{x:.3f}" if x is not None else "—"


def table(rows: list[dict]) -> list[str]:
    out = ["| shape | B | fwd planner | pred µs | meas µs | fwd best | best µs | fwd ratio | "
           "bwd planner (dK/dV; dQ) | pred µs | meas µs | bwd best (dK/dV; dQ) | best µs | bwd ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kernels"]
        f, kv, q = k.get("fwd", {}), k.get("dkdv", {}), k.get("dq", {})
        bp = (kv.get("planner_pred_us") or 0) + (q.get("planner_pred_us") or 0)
        out.append(
            f"| {r['label']} | {r['B']} | {cfg_text(f.get('planner'))} | {_us(f.get('planner_pred_us'))} | "
            f"{_us(f.get('planner_us'))} | {cfg_text(f.get('best'))} | {_us(f.get('best_us'))} | {_r(r.get('fwd_ratio'))} | "
            f"{cfg_text(kv.get('planner'))}; {cfg_text(q.get('planner'))} | {_us(bp)} | {_us(r.get('bwd_planner_us'))} | "
            f"{cfg_text(kv.get('best'))}; {cfg_text(q.get('best'))} | {_us(r.get('bwd_best_us'))} | {_r(r.get('bwd_ratio'))} |")
    return out


def markdown(result: dict) -> str:
    s, env = result["summary"], result["env"]
    verdict = []
    for part, name in (("fwd", "forward"), ("bwd", "backward (dK/dV + dQ)")):
        p = s.get(part)
        if p:
            verdict.append(f"- {name}: median {p['median']:.3f}, min {p['min']:.3f} over {p['n']} shapes "
                           f"({'meets' if p['pass'] else 'MISSES'} >= 0.95 median, >= 0.90 min)")
    ks, names = s.get("kernels", {}), (("fwd", "fwd"), ("dkdv", "dK/dV"), ("dq", "dQ"))
    per = [f"{name} {ks[k]['median']:.3f} / {ks[k]['min']:.3f}" for k, name in names if k in ks]
    err = [f"{name} {ks[k]['predicted_over_measured']:.2f}" for k, name in names
           if ks.get(k, {}).get("predicted_over_measured")]
    if per:
        verdict.append(f"- each kernel alone, median / min: {', '.join(per)}")
    if err:
        verdict.append(f"- cost model at the planner's tiles, median predicted / measured time: {', '.join(err)}")
    if s.get("untimed"):
        verdict.append(f"- not in this sweep's grid, so left out of the ratios: the planner's choice for "
                       f"{'; '.join(s['untimed'])}")
    c = result["compile"]
    lines = [
        "## Planner sweep: untuned tiles against exhaustive search",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; {env['date']}; "
        f"`{result['command']}`"
        + (f"; the planner's choices and predictions redone by `{result['replanned']}`" if result.get("replanned") else "")
        + ".",
        "",
        f"Grid `{result['args']['grid']}`; ratio = best time / planner time (the planner's share of the "
        f"best throughput), per shape; the backward adds dK/dV and dQ. Each kernel timed alone, median of "
        f"{result['args']['reps']} reps "
        + ("between CUDA events, L2 flushed before each" if env["device"] == "cuda" else "of wall time (interpreter)")
        + f"; configs already "
        f"{result['args']['cut']}x slower than the best after {MIN_CUT_REPS} reps stop there. `pred` is the "
        f"planner's predicted time for the shape. Planner called with "
        f"{', '.join(result['plan_keywords']) or 'no shape keywords'}.",
        "",
        f"Acceptance (>= 24 shapes): **{'PASS' if s['accepted'] else 'FAIL'}** — "
        f"{s['complete_shapes']} of {s['shapes_wanted']} shapes measured"
        + ("" if result["complete"] else " (run stopped at the time budget)") + ".",
        *verdict,
        "",
        *table(result["rows"]),
        "",
        f"Compiles: {c['jobs']} (family, kernel, config) jobs on {c['workers']} workers ({c['cpu_s']:.0f} CPU-s; "
        f"the whole run took {c['elapsed_s']:.0f} s), "
        f"{c['failed']} failed or out of resources; {c['sram_skipped']} grid configs skipped because the cost "
        f"model puts their SRAM over the limit (x{result['args']['sram_slack']}). Per-config times, predictions, "
        f"shared memory, registers and spills: `planner_sweep.json`.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [r.get("fwd_ratio") or 0 for r in rows], 0.4, label="forward")
    a.bar([x + 0.2 for x in xs], [r.get("bwd_ratio") or 0 for r in rows], 0.4, label="backward (dK/dV + dQ)")
    for y, style in ((0.95, "--"), (0.90, ":")):
        a.axhline(y, color="k", linestyle=style, linewidth=0.8)
    a.set_xticks(list(xs))
    a.set_xticklabels([r["label"].replace(" ", "\n", 2) for r in rows], fontsize=6)
    a.set_ylim(0.5, 1.02)
    a.set_ylabel("planner throughput / best")
    a.legend(fontsize=8, loc="lower right")
    a.set_title("planner's choice against the best of the grid", fontsize=10)
    colors = {"fwd": "C0", "dkdv": "C1", "dq": "C2"}
    lo, hi, labelled = math.inf, 0.0, set()
    for r in rows:
        for kernel, unit in r.get("units", {}).items():
            pts = [(c["pred_us"], c["us"]) for c in unit["configs"]
                   if c.get("status") == "ok" and c.get("pred_us") and not c.get("cut")]
            if pts:
                b.scatter([p for p, _ in pts], [m for _, m in pts], s=4, alpha=0.35, color=colors[kernel],
                          label=kernel if kernel not in labelled else None)
                labelled.add(kernel)
                lo, hi = min(lo, *(min(p) for p in pts)), max(hi, *(max(p) for p in pts))
    for kernel, c in colors.items():
        pts = [(r["kernels"][kernel].get("planner_pred_us"), r["kernels"][kernel].get("planner_us"))
               for r in rows if kernel in r["kernels"]]
        pts = [p for p in pts if p[0] and p[1]]
        if pts:
            b.scatter([p for p, _ in pts], [m for _, m in pts], s=28, marker="*", color=c,
                      edgecolor="k", linewidth=0.4, label=f"{kernel}: planner's choice")
    if hi > 0:
        b.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
        b.set_xscale("log")
        b.set_yscale("log")
    b.set_xlabel("predicted µs")
    b.set_ylabel("measured µs")
    if labelled:
        b.legend(fontsize=7)
    b.set_title("cost model: predicted against measured (every timed config)", fontsize=10)
    env = result["env"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: str) -> dict:
    import torch
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": device,
           "date": datetime.date.today().isoformat()}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        import platform

        env.update(gpu=f"CPU ({platform.machine()}, Triton interpreter)")
    return env


def dumps(result: dict) -> str:
    """Indented JSON with lists of numbers, and each config's row, on one line (some 3000 rows
    in a full sweep)."""
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r"\n\s*", " ", m.group(1)) + "]", text)
    return re.sub(r'\{\n\s*("cfg": \[.*?)\n\s*\}', lambda m: "{" + re.sub(r"\n\s*", " ", m.group(1)) + "}",
                  text, flags=re.S)


def scratch_dir(args) -> str:
    return args.out_dir or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")


def write(result: dict, args, final: bool) -> list[str]:
    """Partial: JSON only, to the scratch folder. Final: JSON, markdown and plot to docs/ (CUDA,
    no --out-dir) plus $OUT, or to --out-dir / $OUT / benchmarks/out."""
    if not final:
        d = scratch_dir(args)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "planner_sweep.partial.json"), "w") as f:
            f.write(dumps(result))
        return [d]
    docs = result["env"]["device"] == "cuda" and not args.out_dir and not args.no_doc
    dirs = [os.path.join(ROOT, "docs")] + ([os.environ["OUT"]] if os.environ.get("OUT") else []) if docs \
        else [scratch_dir(args)]
    md = markdown(result)
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "planner_sweep.json"), "w") as f:
            f.write(dumps(result))
        with open(os.path.join(d, "planner_sweep.md"), "w") as f:
            f.write(md)
        try:
            plot(result, os.path.join(d, "planner_sweep.png"))
        except ImportError as e:
            print(f"no plot: {e}")
    return dirs


# ---- the sweep ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self():6.1f}s] {text}", flush=True)


def build(args, shapes, gpu, elt):
    """Plans per shape, and per (family, kernel) the configs to compile and time."""
    plans, keywords = {}, []
    for s in shapes:
        plans[s], keywords = planner_plan(s, gpu, elt, args.tiny)
    families = list(dict.fromkeys(s.family for s in shapes))
    units = {}  # (family, kernel) -> (configs, skipped)
    for fam in families:
        fam_shapes = [s for s in shapes if s.family == fam]
        for kernel in KERNELS:
            slack = math.inf if args.tiny else args.sram_slack
            units[fam, kernel] = candidates(fam_shapes, kernel, gpu, elt, args.grid, slack, plans)
    return plans, keywords, families, units


def dry_run(args) -> int:
    from flashfx.planner import hardware

    gpu, elt = hardware.KNOWN["H200"], 2
    shapes = select(all_shapes(ns=_ns(args)), args.shapes, args.families)
    plans, keywords, families, units = build(args, shapes, gpu, elt)
    print(f"dry run: planner for {gpu.name} (hardware.KNOWN), bf16, grid {args.grid}, "
          f"plan keywords: {', '.join(keywords) or 'none'}\n")
    print(f"{len(shapes)} shapes, {len(families)} kernel families")
    print("| shape | B | H/Hk | fwd | pred µs | dK/dV | pred µs | dQ | pred µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    est_gpu = 0.0
    for s in shapes:
        tp = plans[s]
        cells = " | ".join(f"{cfg_text(tiles_of(tp, k))} | {_us(to_us(getattr(t, 'time_s', 0)))}"
                           for k, t in (("fwd", tp.fwd), ("dkdv", tp.bwd_dkdv), ("dq", tp.bwd_dq)))
        print(f"| {s.label} | {s.B} | {s.H}/{s.Hk} | {cells} |")
        for k in KERNELS:  # what timing every config would cost, by the model's own times
            for c in units[s.family, k][0]:
                t = getattr(model(k, s, gpu, elt, c), "time_s", 0) or 0
                est_gpu += (args.warmup + args.reps) * (t + 40e-6) if math.isfinite(t) else 0
    print("\n| family | fwd | dK/dV | dQ | skipped for SRAM (fwd, dK/dV, dQ) |")
    print("|---|---|---|---|---|")
    jobs, cpu_s = 0, 0.0
    for fam in families:
        n = {k: len(units[fam, k][0]) for k in KERNELS}
        skip = [len(units[fam, k][1]) for k in KERNELS]
        jobs += sum(n.values())
        cpu_s += sum(n[k] * EST_COMPILE_S[fam.D][k] for k in n)
        print(f"| {fam.label} | {n['fwd']} | {n['dkdv']} | {n['dq']} | {', '.join(map(str, skip))} |")
    workers = args.jobs or DEFAULT_JOBS
    print(f"\n{jobs} compile jobs; ~{cpu_s:.0f} CPU-s of compiling (sm90, 1-5 s a config), "
          f"~{cpu_s / workers:.0f} s on {workers} workers; timing every config with "
          f"{args.warmup}+{args.reps} reps at the model's times: ~{est_gpu:.0f} s of GPU without --cut, "
          f"overlapped with compiling.")
    return 0


def sweep(args) -> int:
    import torch

    from flashfx.planner import hardware

    clock = Clock()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float16 if args.tiny else torch.bfloat16  # the 3.9 interpreter mis-reads bf16 dots
    gpu = hardware.INTERPRETER if args.tiny else hardware.current()
    elt = dtype.itemsize
    env = environment(device)
    shapes = select(all_shapes(args.tiny, _ns(args)), args.shapes, args.families)
    if not shapes:
        print("no shape matches --shapes / --families")
        return 1
    plans, keywords, families, units = build(args, shapes, gpu, elt)
    order = [(fam, k) for fam in families for k in KERNELS]
    n_jobs = sum(len(units[u][0]) for u in order)
    clock.log(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; {len(shapes)} shapes, "
              f"{len(families)} families, {n_jobs} compile jobs on {args.jobs or 'no'} workers, grid {args.grid}")

    # ---- submit every compile, in the order the main process will time them
    compile_n = TINY_TOKENS if args.tiny else COMPILE_N
    dtype_name = str(dtype).removeprefix("torch.")
    pool, futures = None, {}
    if args.jobs > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        for u in order:
            futures[u] = {c: pool.submit(compile_job, u[0], u[1], c, compile_n, dtype_name, args.tiny)
                          for c in units[u][0]}

    result = {
        "env": env, "args": vars(args), "plan_keywords": keywords, "complete": False,
        "command": " ".join(["PYTHONPATH=. python3 benchmarks/planner_sweep.py", *args.argv]),
        "rows": [], "compile": {}, "summary": {},
    }
    rows = {s: {"label": s.label, "D": s.D, "N": s.N, "B": s.B, "H": s.H, "Hk": s.Hk, "causal": s.causal,
                "plan": plans[s].summary() if hasattr(plans[s], "summary") else "", "kernels": {}, "units": {}}
            for s in shapes}
    result["rows"] = list(rows.values())
    compiled_all, cases = {}, {}
    timer = Timer(device, args.reps, args.warmup, args.cut)
    compile_done = 0
    stopped = False
    try:
        for fam, kernel in order:
            u = (fam, kernel)
            # ---- wait for this unit's compiles (the pool goes on with the next units meanwhile)
            if pool is not None:
                compiled = collect(futures[u], timeout=args.budget_s - clock())
                if compiled is None:
                    stopped = True
                    clock.log(f"time budget reached while compiling {fam.label} {kernel}")
                    break
            else:
                compiled = {c: compile_job(fam, kernel, c, compile_n, dtype_name, args.tiny) for c in units[u][0]}
            compiled_all[u] = compiled
            compile_done += len(compiled)
            bad = sum(1 for i in compiled.values() if i["status"] != "ok")
            clock.log(f"compiled {compile_done}/{n_jobs}: {fam.label} {kernel}, {len(compiled)} configs"
                      + (f", {bad} failed" if bad else ""))
            # ---- time this kernel at every shape of the family
            for s in [s for s in shapes if s.family == fam]:
                if clock() > args.budget_s:
                    stopped = True
                    break
                if s not in cases:
                    cases[s] = Case(s, plans[s], device, dtype)
                row = rows[s]
                unit = time_unit(cases[s], kernel, units[u][0], compiled, timer, gpu, elt)
                row["units"][kernel] = unit
                row["kernels"][kernel] = kr = kernel_result(unit, plans[s], kernel)
                finish_row(row)
                clock.log(f"{s.label:26} {kernel:4}: planner {cfg_text(kr['planner'])} {_us(kr['planner_us'])} us "
                          f"(pred {_us(kr['planner_pred_us'])}), best {cfg_text(kr['best'])} {_us(kr['best_us'])} us"
                          f", ratio {_r(ratio(kr['best_us'], kr['planner_us']))} [{kr['timed']} timed, {kr['cut']} cut"
                          f", {kr['failed']} failed"
                          + (f", {kr['compiled_here']} not precompiled" if kr["compiled_here"] else "") + "]")
            if stopped:
                clock.log("time budget reached while timing")
                break
            if kernel == "dq":  # the family is done: free its tensors
                for s in [s for s in shapes if s.family == fam]:
                    cases.pop(s, None)
                if device == "cuda":
                    torch.cuda.empty_cache()
            _fill(result, rows, compiled_all, units, pool, args, clock, len(shapes))
            write(result, args, final=False)
    finally:
        if pool is not None:  # cancel what is queued; end our own workers, by handle
            workers = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for w in workers:
                if w.is_alive():
                    w.terminate()
    result["complete"] = not stopped
    _fill(result, rows, compiled_all, units, pool, args, clock, len(shapes))
    dirs = write(result, args, final=True)
    clock.log(f"wrote planner_sweep.json, .md, .png under {', '.join(dirs)}")
    print()
    print(markdown(result))
    return 0


def replan(args) -> int:
    """--replan: a recorded sweep scored again with the current planner (after a calibration
    fit or a model change): each shape's choices and every config's predicted time are redone,
    the measured times kept; the result is written as a final sweep."""
    from flashfx.planner import hardware

    with open(args.replan) as f:
        result = json.load(f)
    gpu = hardware.lookup(result["env"]["gpu"]) or hardware.KNOWN["H200"]
    for row in result["rows"]:
        s = Shape(row["D"], row["N"], row["B"], row["H"], row["Hk"], row["causal"])
        tp, _ = planner_plan(s, gpu, 2, False)
        row["plan"] = tp.summary()
        for kernel, unit in row["units"].items():
            unit["planner"] = list(tiles_of(tp, kernel))
            for c in unit["configs"]:
                c["pred_us"] = to_us(getattr(model(kernel, s, gpu, 2, tuple(c["cfg"])), "time_s", None))
            row["kernels"][kernel] = kernel_result(unit, tp, kernel)
        finish_row(row)
    result["summary"] = summary(result["rows"], result["summary"].get("shapes_wanted", len(result["rows"])))
    result["replanned"] = " ".join(["PYTHONPATH=. python3 benchmarks/planner_sweep.py", *args.argv])
    args.out_dir = args.out_dir or (None if result["env"].get("device") == "cuda" else scratch_dir(args))
    dirs = write(result, args, final=True)
    print(f"replanned {len(result['rows'])} shapes; wrote under {', '.join(dirs)}")
    print(markdown(result))
    return 0


def _fill(result, rows, compiled_all, units, pool, args, clock, wanted):
    infos = [i for c in compiled_all.values() for i in c.values()]
    result["compile"] = {
        "jobs": len(infos), "workers": args.jobs if pool is not None else 0, "elapsed_s": clock(),
        "failed": sum(1 for i in infos if i["status"] != "ok"),
        "cpu_s": sum(i.get("compile_s", 0) for i in infos),
        "sram_skipped": sum(len(units[u][1]) for u in compiled_all),
        "skipped_configs": {f"{u[0].label} {u[1]}": [list(c) for c in units[u][1]] for u in compiled_all if units[u][1]},
    }
    done = [r for r in rows.values() if r["kernels"]]
    result["rows"] = done
    result["summary"] = summary(done, wanted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("full", "small"), default="full")
    p.add_argument("--ns", default="1024,4096",
                   help="sequence lengths (B = 16384 // N); the acceptance is over 1024,4096")
    p.add_argument("--shapes", default=None, help="only these, e.g. 128:4096,64:1024:causal:gqa")
    p.add_argument("--families", default=None, help="only these kernel families, e.g. d128,causal-gqa4")
    p.add_argument("--jobs", type=int, default=None,
                   help="compile workers (default: CPUs - 2, at most 14; 0: compile in the main process)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cut", type=float, default=1.25,
                   help="stop timing a config after 5 reps if slower than this x the best so far (0: never)")
    p.add_argument("--sram-slack", type=float, default=1.0, help="skip configs the model puts over this x the SRAM limit")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop timing after this many seconds and report")
    p.add_argument("--dry-run", action="store_true", help="no GPU: shapes, grid sizes and the plans for an H200")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1 (times mean nothing)")
    p.add_argument("--out-dir", default=None, help="write results here, not to docs/")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/")
    p.add_argument("--replan", default=None, metavar="JSON",
                   help="no GPU: score a recorded sweep again with the current planner, and rewrite it")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        return dry_run(args)
    if args.replan:
        return replan(args)
    if args.jobs is None:
        args.jobs = 0 if args.tiny else max(1, min(DEFAULT_JOBS, (os.cpu_count() or 2) - 2))
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is loaded
        args.grid = "tiny"
        args.reps, args.warmup = min(args.reps, 3), min(args.warmup, 1)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("benchmarks/planner_sweep.py needs a CUDA GPU (or --dry-run, or --tiny on CPU)")
        return 1
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
