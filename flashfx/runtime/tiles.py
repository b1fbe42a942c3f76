"""The tiles one call's kernels run with: the planner's plan for the call's shape, or, with
`options={"autotune": True}`, the fastest of the planner's top candidates, measured once per
GPU and shape bucket and kept on disk.

Shape buckets: sequence lengths and batch x heads rounded up to powers of two, so that a
model whose sequence length changes plans (and tunes) once per octave, not per length.

    for_call(q, k, program)                 the plan for this call (the forward's and backward's)
    tuned(base, key, kernels, run, cands)   `base` with each kernel in `kernels` replaced by the
                                            fastest candidate, from the cache or measured now
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import statistics
import tempfile
import threading
import time
from functools import lru_cache
from typing import Callable

import torch

from flashfx import config
from flashfx.ir import ScoreProgram
from flashfx.planner import hardware
from flashfx.planner.plan import KernelTiles, TilePlan, candidates, plan

log = logging.getLogger("flashfx")

FIELD = {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}
TOP_K = 4  # candidates measured per kernel
WARMUP, REPS = 2, 7
# the Triton interpreter has no SRAM to plan for: tuning there picks among small tiles
INTERPRETER_CANDIDATES = (KernelTiles(16, 16, 4, 1, 0), KernelTiles(32, 16, 4, 1, 0))


def interpreting() -> bool:
    return config.getenv("TRITON_INTERPRET") == "1"


def bucket(n: int, lo: int = 16) -> int:
    """n rounded up to a power of two (at least `lo`)."""
    p = lo
    while p < n:
        p *= 2
    return p


def gpu_of(device: torch.device) -> hardware.GPU:
    """What to plan for on `device`: the user's override, else the device's properties."""
    chosen = hardware.chosen_by_user()
    if chosen is not None:
        return chosen
    return _device_gpu(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _device_gpu(index: int) -> hardware.GPU:  # properties do not change while a process runs
    return hardware.current(index)


def operand_bytes(operands) -> int:
    """Bytes the program's operands add per score (each loaded as a [BM, BN] tile)."""
    return sum(x.element_size() for x in operands)


def tf32_allowed() -> bool:
    """Whether the user's torch settings let fp32 matmuls run in TF32.

    Reads torch.backends.cuda.matmul.fp32_precision ("tf32", "ieee", or "none": the default,
    IEEE), which both the legacy flag (allow_tf32 = True) and set_float32_matmul_precision
    set. Reading allow_tf32 itself raises once the new API has set TF32 (torch 2.9 and later).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def products(dtype: torch.dtype) -> int:
    """Tensor-core products per matrix product: 3 for fp32 inputs where TF32 is not allowed
    (3xTF32, see gpu._precision), else 1."""
    return 3 if dtype == torch.float32 and not tf32_allowed() else 1


def call_shape(q_shape, k_shape, program: ScoreProgram, op_bytes: int = 0, dtype: torch.dtype | None = None) -> dict:
    """The planner's shape keywords for a call, bucketed."""
    B, H, Nq, _ = (int(x) for x in q_shape)
    Hk, Nk = int(k_shape[1]), int(k_shape[2])
    return dict(n_q=bucket(Nq), n_k=bucket(Nk), causal=program.causal is not None,
                group=max(1, H // Hk), batch_heads=bucket(B * H, lo=1), operand_bytes=op_bytes,
                products=products(dtype) if dtype is not None else 1)


_plans: dict[tuple, TilePlan] = {}  # every op call asks: answer repeats from a dict
_PLANS_MAX = 4096
_margins_version = 0  # bumped when a margin changes, so remembered plans are made again


def for_shape(q_shape, k_shape, dtype: torch.dtype, device: torch.device, program: ScoreProgram,
              op_bytes: int = 0) -> TilePlan:
    """The planner's plan for a call of these shapes (no tuning). Remembered per shapes, dtype,
    device, program and GPU choice: this runs on every call of the op, ahead of the launches."""
    if not all(type(x) is int for x in (*q_shape, *k_shape)):  # symbolic sizes: nothing to key
        return _for_shape(q_shape, k_shape, dtype, device, program, op_bytes)
    key = (tuple(q_shape), tuple(k_shape), dtype, device, program, op_bytes, _margins_version,
           hardware.chosen_by_user(), interpreting(), products(dtype))
    hit = _plans.get(key)
    if hit is None:
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        hit = _plans[key] = _for_shape(q_shape, k_shape, dtype, device, program, op_bytes)
    return hit


def _for_shape(q_shape, k_shape, dtype, device, program, op_bytes) -> TilePlan:
    elt = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda" and not interpreting():
        gpu = gpu_of(device)
        margin = _margins.get(_margin_key(gpu, program, q_shape[-1], dtype))
        if margin:  # a launch overflowed this plan's SRAM before: plan within less
            gpu = dataclasses.replace(gpu, smem_per_block=gpu.smem_per_block - margin)
        return plan(int(q_shape[-1]), elt, gpu, **call_shape(q_shape, k_shape, program, op_bytes, dtype))
    return plan(int(q_shape[-1]), elt, hardware.INTERPRETER, interpret=True)


def margin(device: torch.device, program: ScoreProgram, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes below the SRAM limit that plans for this program are made within (0 until a
    launch ran out of shared memory)."""
    where = gpu_of(device) if device.type == "cuda" else hardware.INTERPRETER
    return _margins.get(_margin_key(where, program, head_dim, dtype), 0)


def for_call(q: torch.Tensor, k: torch.Tensor, program: ScoreProgram, operands=()) -> TilePlan:
    return for_shape(q.shape, k.shape, q.dtype, q.device, program, operand_bytes(operands))


def candidate_tiles(kernel: str, q: torch.Tensor, k: torch.Tensor, program: ScoreProgram,
                    operands=()) -> list[KernelTiles]:
    if q.device.type != "cuda" or interpreting():
        return list(INTERPRETER_CANDIDATES)
    return candidates(kernel, q.shape[-1], q.element_size(), gpu_of(q.device), k=TOP_K,
                      **call_shape(q.shape, k.shape, program, operand_bytes(operands), q.dtype))


# ---- when the model under-counts SRAM ---------------------------------------------------------

_margins: dict[tuple, int] = {}  # (GPU, program, head dim, dtype) -> bytes to plan below the limit
MAX_REPLANS = 3


def _margin_key(gpu: hardware.GPU, program: ScoreProgram, head_dim, dtype) -> tuple:
    return (gpu.name, dataclasses.replace(program, autotune=False).encode(), int(head_dim), dtype)


def _overflow(e: Exception) -> int | None:
    """Bytes by which a launch exceeded shared memory, if `e` says so (Triton's OutOfResources)."""
    if type(e).__name__ != "OutOfResources" or "shared memory" not in str(e):
        return None
    required, limit = getattr(e, "required", None), getattr(e, "limit", None)
    if required is None or limit is None:
        m = re.search(r"Required: (\d+), Hardware limit: (\d+)", str(e))
        if not m:
            return None
        required, limit = int(m.group(1)), int(m.group(2))
    return max(int(required) - int(limit), 1024)


def run_planned(run: Callable[[TilePlan], object], q: torch.Tensor, k: torch.Tensor,
                program: ScoreProgram, operands, kernels: tuple[str, ...], wanted: str = ""):
    """`run(plan)` with the plan for this call (tuned when the program asks). Should a launch
    still run out of shared memory (the model under-counted what the compiler allocates), plan
    again within that much less, remember the margin for this program, and retry."""
    for attempt in range(MAX_REPLANS + 1):
        tiles = for_call(q, k, program, operands)
        if program.autotune:
            tiles = tuned(tiles, {kern: tune_key(kern, q, k, program, operands, wanted) for kern in kernels},
                          run, lambda kern: candidate_tiles(kern, q, k, program, operands), q.device)
        try:
            return run(tiles)
        except Exception as e:  # noqa: BLE001 - only shared-memory overflows are retried
            extra = _overflow(e)
            if extra is None or attempt == MAX_REPLANS:
                raise
            where = gpu_of(q.device) if q.device.type == "cuda" else hardware.INTERPRETER
            key = _margin_key(where, program, q.shape[-1], q.dtype)
            _margins[key] = _margins.get(key, 0) + extra
            global _margins_version
            _margins_version += 1
            log.info("flashfx: %s; planning again within %d fewer bytes", str(e).splitlines()[0], _margins[key])


def tune_key(kernel: str, q: torch.Tensor, k: torch.Tensor, program: ScoreProgram, operands=(),
             extra: str = "") -> str:
    """What a tuned choice is valid for: GPU, kernel, score program, head dim, dtype, bucket."""
    where = "interpreter" if q.device.type != "cuda" or interpreting() else gpu_of(q.device).name
    shape = call_shape(q.shape, k.shape, program, operand_bytes(operands), q.dtype)
    prog = hashlib.sha256(dataclasses.replace(program, autotune=False).encode().encode()).hexdigest()[:12]
    return (f"{where}|{kernel}{extra}|{prog}|d{q.shape[-1]}|{str(q.dtype).removeprefix('torch.')}|"
            f"nq{shape['n_q']}|nk{shape['n_k']}|g{shape['group']}|bh{shape['batch_heads']}|x{shape['operand_bytes']}"
            + (f"|p{shape['products']}" if shape["products"] > 1 else ""))


# ---- the on-disk cache ------------------------------------------------------------------------

_lock = threading.Lock()
_memory: dict[str, list] | None = None


def cache_path() -> str:
    root = os.environ.get("FLASHFX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "flashfx")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, "autotune.json")


def _entries() -> dict[str, list]:
    global _memory
    if _memory is None:
        try:
            with open(cache_path()) as f:
                _memory = json.load(f)
        except (OSError, ValueError):
            _memory = {}
    return _memory


def _store(key: str, tiles: KernelTiles) -> None:
    with _lock:
        entries = _entries()
        entries[key] = [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages, tiles.keys_down]
        try:  # merge with what other processes wrote meanwhile, then replace atomically
            with open(cache_path()) as f:
                entries = {**json.load(f), **entries}
        except (OSError, ValueError):
            pass
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_path()), suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(tmp, cache_path())


def clear_memory() -> None:
    """Forget what was read from disk (the next lookup reads the file again)."""
    global _memory
    _memory = None


# ---- measuring --------------------------------------------------------------------------------


def _seconds(run: Callable[[], None], device: torch.device) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def tuned(base: TilePlan, keys: dict[str, str], run: Callable[[TilePlan], None],
          cands: Callable[[str], list[KernelTiles]], device: torch.device) -> TilePlan:
    """`base` with each kernel of `keys` ({kernel: cache key}) replaced by its cached winner,
    or by the fastest of `cands(kernel)`, timed by `run(plan)` with the other kernels' tiles
    as they stand. Inside CUDA graph capture nothing is measured: the cache or `base`."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    plan_now = base
    for kernel, key in keys.items():
        hit = _entries().get(key)
        if hit is not None:
            bm, bn, w, s, *down = hit  # (entries written before tiles had an orientation: 4 fields)
            plan_now = dataclasses.replace(plan_now, **{FIELD[kernel]: KernelTiles(bm, bn, w, s, 0,
                                                                                   keys_down=bool(down and down[0]))})
            continue
        if capturing:
            continue
        best, best_t = None, float("inf")
        for tiles in cands(kernel):
            trial = dataclasses.replace(plan_now, **{FIELD[kernel]: tiles})
            try:
                t = _seconds(lambda: run(trial), device)
            except Exception:  # noqa: BLE001 - a candidate that cannot run loses
                continue
            if t < best_t:
                best, best_t = tiles, t
        if best is not None:
            _store(key, best)
            plan_now = dataclasses.replace(plan_now, **{FIELD[kernel]: best})
    return plan_now
