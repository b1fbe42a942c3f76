"""Launch the generated Triton kernels (CUDA, or the Triton interpreter on CPU tensors)."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Callable

import torch

from flashfx import config
from flashfx.codegen import attention as codegen
from flashfx.codegen import hopper, hopper_bwd
from flashfx.ir import ScoreProgram
from flashfx.planner import cost, hardware
from flashfx.planner.plan import TilePlan, kv_splits
from flashfx.runtime import tiles as tiling
from flashfx.runtime.tiles import interpreting  # noqa: F401 - re-exported

_CAUSAL_CODE = {None: 0, "top_left": 1, "bottom_right": 2}


def tile_plan(q: torch.Tensor, k: torch.Tensor | None = None, program: ScoreProgram | None = None,
              operands=()) -> TilePlan:
    """The planner's plan for a call with these q and k (k defaults to q's shape)."""
    return tiling.for_call(q, q if k is None else k, program or ScoreProgram(), operands)


def _kernels(program: ScoreProgram, grad_operands: tuple = ()):
    return _kernels_for(program, tuple(grad_operands), config.getenv("TRITON_INTERPRET") or "0")


@lru_cache(maxsize=256)  # on every call: encoding the program and hashing its text add up
def _kernels_for(program: ScoreProgram, grad_operands: tuple, interpret: str):
    # tuning does not change the kernels' source: one module for tuned and untuned programs
    if program.autotune:
        program = dataclasses.replace(program, autotune=False)
    return codegen.load(program.encode(), grad_operands)


def _precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: fp16/bf16 ignore it; fp32 inputs use TF32 where the user's
    settings allow it, else "tf32x3": each operand is split into a TF32 part and a TF32
    remainder and three tensor-core products are summed, which loses the product of the two
    remainders and the remainders' own rounding, each about 2^-22 relative (on the H200 the
    attention's error against float64 was 5.6e-7 to 8.3e-7, 8.0e-7 with fp32 FMAs). Triton's
    "ieee" dot (fp32 FMAs on the CUDA cores) spills 47-186 KB a thread at the planner's tiles on
    sm_90 and takes minutes to compile. The planner knows which (tiles.products)."""
    return "tf32x3" if tiling.products(q.dtype) == 3 else "tf32"


# Tensor descriptors (TMA) for the streamed tiles: None chooses (Hopper and later, when the
# tensors' layout allows); True or False forces (True also under the Triton interpreter).
TMA: bool | None = None
# dK/dV's loop over a GQA group: None chooses; True one flattened loop; False nested loops.
FLAT_DKDV: bool | None = None
# Parts of the forward's key range: None chooses (plan.kv_splits, on CUDA); an int forces.
FWD_SPLITS: int | None = None
# The forward's tiles of a GQA group's query heads together (one program per K/V head, each K/V
# block read once for the group): None chooses (`packs`); True or False forces (under GQA).
GQA_PACK: bool | None = None
# The warp-specialized Gluon forward on sm_90 (codegen.hopper) for the programs it covers:
# None chooses it there (FLASHFX_WS_FORWARD=0 turns it off); False never.
WS_FORWARD: bool | None = None
# The warp-specialized Gluon backward on sm_90 (codegen.hopper_bwd: dK/dV, and dQ with Δ),
# likewise (FLASHFX_WS_BACKWARD=0).
WS_BACKWARD: bool | None = None
# Its dQ alone: None follows WS_BACKWARD; False leaves dQ and Δ to the generated kernel.
WS_DQ: bool | None = None


def ws_forward(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
               n_k: int, batch_heads: int) -> str | None:
    """None when the warp-specialized forward computes such a call's forward (where the copy
    engine can read its tensors); else why not."""
    return _ws_why(WS_FORWARD, "FLASHFX_WS_FORWARD", device,
                   lambda: hopper.supports(program, dtype, device, head_dim, n_q, n_k, batch_heads))


def ws_backward(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
                n_k: int) -> str | None:
    """None when the warp-specialized dK/dV computes such a call's dK and dV (where the copy
    engine can read its tensors); else why not. dQ and Δ: `ws_dq`."""
    return _ws_why(WS_BACKWARD, "FLASHFX_WS_BACKWARD", device,
                   lambda: hopper_bwd.supports(program, dtype, device, head_dim, n_q, n_k))


def ws_dq(program: ScoreProgram, dtype: torch.dtype, device: torch.device, head_dim: int, n_q: int,
          n_k: int) -> str | None:
    """None when the warp-specialized dQ computes such a call's dQ and Δ (where the copy engine
    can read its tensors); else why not."""
    if WS_DQ is False:
        return "turned off"
    return _ws_why(WS_BACKWARD, "FLASHFX_WS_BACKWARD", device,
                   lambda: hopper_bwd.dq_supports(program, dtype, device, head_dim, n_q, n_k))


def _ws_why(switch: bool | None, env: str, device: torch.device, supports: Callable[[], str | None]) -> str | None:
    if switch is False or (switch is None and config.getenv(env) == "0"):
        return "turned off"
    if tiling.interpreting():
        return "Triton interpreter"
    why = supports()
    if why is None and not _tma_allowed(device):  # it reads through descriptors only
        return "descriptor reads turned off (gpu.TMA, FLASHFX_TMA=0)"
    return why


@lru_cache(maxsize=8)
def _tma_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_layout_ok(t: torch.Tensor) -> bool:
    """The copy engine reads rows of unit stride at 16-byte-multiple strides (the base address
    must be 16-byte aligned too: checked per call, see `_aligned`)."""
    if t.stride(-1) != 1 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return all(s > 0 and (s * t.element_size()) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _tma_allowed(device: torch.device) -> bool:
    """Whether descriptor reads may be used on `device` at all (the layout decides per call)."""
    if TMA is not None:
        return TMA
    if config.getenv("FLASHFX_TMA") == "0" or tiling.interpreting() or device.type != "cuda":
        return False
    return _tma_capable(device.index or 0)


def _geometry(t: torch.Tensor) -> tuple[list, list]:
    """Shape and strides of a 4-D descriptor over t (a size-1 dimension's stride is never used:
    it gets a legal one)."""
    strides = list(t.stride())
    for i in range(3):
        if t.shape[i] == 1:
            strides[i] = t.shape[i + 1] * strides[i + 1] if i < 2 else t.shape[3]
    return list(t.shape), strides


def _seed_args(program: ScoreProgram, seed) -> list:
    if not program.dropout:
        return []
    if seed is None:
        raise ValueError("flashfx: a program with dropout needs a seed tensor")
    return [seed]


# ---- launches -----------------------------------------------------------------------------
#
# Every op call launches the same kernels with the same grids and compile-time arguments as
# every earlier call of its signature (program, shapes, strides, dtypes, device, and the settings
# that steer planning and tile reads). A `_Launch` keeps what a signature fixes, and the
# signature's call (`_forward_call`, `_backward_call`) its integer arguments too; a call then
# only allocates its outputs and passes its tensors. The first call of a signature plans,
# through tiles.run_planned (which replans should shared memory overflow), and keeps the
# call that ran.


class _Kernel:
    """A Triton kernel with its grid and compile-time arguments bound, for one signature.

    Triton's launch binds and specializes every argument on every call: tens of µs of host
    time, several launches per attention. The first call here goes through it and keeps the
    compiled binary it returns; later calls hand the arguments straight to that binary's
    launcher, as Triton does once it has found the binary in its cache, when they would
    specialize alike. Within one signature every integer argument is fixed and descriptors
    are built only on aligned tensors; what can vary is a pointer's 16-byte alignment (a view
    at an odd offset) and the current device: either sends the call back through Triton.

    `descs` names the arguments read through tensor descriptors: the call passes their tensors
    and this kernel describes them (a signature fixes each one's shape, strides and box; only
    its address varies). Triton's launcher encodes every descriptor on every launch (a driver
    call) after walking all arguments in Python; where its launcher has the layout this class
    knows (`_raw_launcher`), the encoded descriptors are kept per address and the launch goes
    to the compiled launcher directly.
    """

    __slots__ = ("jit", "grid", "constexprs", "descs", "describe", "binary", "driver", "device", "tail",
                 "tensor_at", "raw", "coop", "pdl", "metas", "encode", "encodings")

    def __init__(self, jit, grid: tuple, constexprs: dict, descs: tuple = (), describe: Callable | None = None):
        self.jit, self.constexprs, self.descs = jit, constexprs, descs  # descs: ((position, shape, strides, box), ...)
        self.describe = describe or _triton_descriptor  # (tensor, shape, strides, box) -> descriptor
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.binary = self.raw = None

    def __call__(self, *args):
        binary = self.binary
        if binary is not None:
            driver = self.driver
            device = driver.get_current_device()
            # _aligned, inlined as a loop (no generator frame): this is the per-call path
            aligned = device == self.device
            for i in self.tensor_at:
                if args[i].data_ptr() & 15:
                    aligned = False
                    break
            if aligned:
                stream = driver.get_current_stream(device)
                hooks = _knobs.runtime
                if self.raw is not None and _quiet(hooks.launch_enter_hook) and _quiet(hooks.launch_exit_hook):
                    self.raw(*self.grid, stream, binary.function, self.coop, self.pdl, None, None,
                             binary.packed_metadata, None, None, None,
                             *(self._encoded(args) if self.descs else args + self.tail))
                    return
                args = self._described(args) + self.tail
                binary.run(*self.grid, stream, binary.function, binary.packed_metadata,
                           binary.launch_metadata(self.grid, stream, *args),
                           hooks.launch_enter_hook, hooks.launch_exit_hook, *args)
                return
        compiled = self.jit[self.grid](*self._described(args), **self.constexprs)
        if binary is None and DIRECT_LAUNCH and not tiling.interpreting():
            self._keep(compiled, args)

    def _described(self, args: tuple) -> tuple:
        if not self.descs:
            return args
        args = list(args)
        for at, shape, strides, box in self.descs:
            args[at] = self.describe(args[at], shape, strides, box)
        return tuple(args)

    def _encoded(self, args: tuple) -> list:
        """The launcher's arguments: each descriptor expanded to its encoding (kept per
        address), then the compile-time tail."""
        out, done = [], 0
        for (at, shape, strides, box), meta in zip(self.descs, self.metas):
            out += args[done:at]
            t = args[at]
            key = (at, t.data_ptr())
            enc = self.encodings.get(key)
            if enc is None:
                if len(self.encodings) >= ENCODINGS_MAX:
                    self.encodings.clear()
                enc = self.encodings[key] = self.encode(self.describe(t, shape, strides, box), meta)
            out += enc
            done = at + 1
        out += args[done:]
        out += self.tail
        return out

    def _keep(self, compiled, args) -> None:
        needed = ("run", "function", "packed_metadata", "launch_metadata")
        if _knobs is None or not all(hasattr(compiled, a) for a in needed):
            return  # not a binary this launcher knows how to run: Triton launches
        names = getattr(self.jit, "arg_names", None)
        if names is None or any(n not in self.constexprs for n in names[len(args):]):
            return  # not a JIT function, or an argument left to its default
        names = names[len(args):]
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        if not _aligned(*(args[i] for i in tensors)):
            return  # a binary specialized for an unaligned pointer: not worth keeping
        from triton.runtime import driver

        self.driver = driver.active
        self.device = self.driver.get_current_device()
        self.tail = tuple(self.constexprs[n] for n in names)
        self.tensor_at = tensors
        self.binary = compiled
        if DIRECT_LAUNCH_RAW:
            raw = _raw_launcher(compiled.run, [at for at, *_ in self.descs])
            if raw is not None:
                self.raw, self.metas, self.encode, self.coop, self.pdl = raw
                self.encodings = {}  # (position, address) -> the descriptor's launcher arguments


def _triton_descriptor(t: torch.Tensor, shape: list, strides: list, box: list):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, shape, strides, box)


def _quiet(hook) -> bool:
    """No launch hook to call: none set, or an empty chain of them."""
    return hook is None or getattr(hook, "calls", None) == []


def _raw_launcher(run, desc_at: list[int]):
    """(compiled launcher, descriptor metadata, encoder, cooperative, pdl) when `run` is Triton
    3.6's CUDA launcher, whose call allocates scratch memory (none here) and hands the
    compiled launcher its arguments after the base ones; with descriptor arguments its
    `launch` is the closure `wrap_handle_tensordesc` makes, which expands each descriptor with
    `make_tensordesc_arg(descriptor, metadata)`, without them the compiled launcher itself.
    Anything else (another Triton, another backend): None, and launches go through `run`."""
    import inspect

    try:
        from triton.backends.nvidia import driver as nv
    except ImportError:
        return None
    if getattr(nv, "_BASE_ARGS_FORMAT", None) != "iiiKKppOOOOOO" or type(run).__name__ != "CudaLauncher":
        return None
    try:
        call = list(inspect.signature(type(run).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if (call != ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)):
        return None
    launch = getattr(run, "launch", None)
    cells = getattr(launch, "__closure__", None)
    if not desc_at:
        return (launch, [], None, run.launch_cooperative_grid, run.launch_pdl) if callable(launch) and not cells else None
    encode = getattr(nv, "make_tensordesc_arg", None)
    if not cells or encode is None:
        return None
    bound = dict(zip(launch.__code__.co_freevars, (c.cell_contents for c in cells)))
    if set(bound) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
        return None
    try:
        params = list(inspect.signature(encode).parameters)
    except (TypeError, ValueError):
        return None
    metas = bound["tensordesc_meta"]
    if (params != ["arg", "metadata"] or set(bound["tensordesc_indices"]) != set(desc_at)
            or not metas or len(metas) != len(desc_at) or any(m is None for m in metas)):
        return None
    return bound["launcher"], list(metas), encode, run.launch_cooperative_grid, run.launch_pdl


# Launch through kept binaries (see _Kernel); False sends every launch through Triton's JIT.
DIRECT_LAUNCH = True
# Encoded descriptors a kept launcher holds, by (position, address). One launcher serves every
# layer of a model whose attention has the same shapes, and the caching allocator gives each
# layer's tensors the same addresses step after step: a model needs layers × descriptors entries
# (GPT-2: 12 × 6). A cap below that clears the cache within every step, and each descriptor is
# then built and encoded again (tens of µs of host time each). 1024 covers 170 layers of six
# descriptors, and bounds the host memory a launcher keeps (an entry is a few hundred bytes).
ENCODINGS_MAX = 1024
# Kept binaries go to Triton 3.6's compiled launcher directly, descriptors encoded once per
# address (see _Kernel); False calls the binary's `run`, which encodes them on every launch.
DIRECT_LAUNCH_RAW = True
try:
    from triton import knobs as _knobs
except ImportError:  # a Triton without runtime knobs: every launch goes through the JIT
    _knobs = None


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One kernel as a signature fixes it: the launcher with its grid and compile-time
    arguments bound, with pointer reads and (when the layout allows) descriptor reads."""

    ptr: Callable
    tma: Callable | None = None  # None: this signature reads through pointers

    def reads(self, *tensors: torch.Tensor) -> Callable:
        """The launcher for these streamed tensors: descriptor reads when allowed and aligned."""
        if self.tma is not None and _aligned(*tensors):
            return self.tma
        return self.ptr


def _launch(kernel, grid, reads: tuple = (), rows: int = 0, dpad: int = 0, **constexprs) -> _Launch:
    """`reads`: the tensors the kernel streams tiles of (descriptor candidates), passed at the
    kernel's *Desc parameters; a descriptor reads a [1, 1, rows, dpad] box."""
    if not reads:
        return _Launch(_Kernel(kernel, grid, constexprs))
    tma = None
    if _tma_allowed(reads[0].device) and all(_tma_layout_ok(t) for t in reads):
        at = [i for i, name in enumerate(kernel.arg_names) if name.endswith("Desc")]
        assert len(at) == len(reads), (kernel.arg_names, len(reads))
        descs = tuple((i, *_geometry(t), [1, 1, rows, dpad]) for i, t in zip(at, reads))
        tma = _Kernel(kernel, grid, {**constexprs, "TMA": True}, descs)
    return _Launch(_Kernel(kernel, grid, {**constexprs, "TMA": False}), tma)


_recipes: dict[tuple, tuple] = {}
_RECIPES_MAX = 1024


def _signature(kind: str, program: ScoreProgram, tensors, operands, extra=()) -> tuple:
    """What fixes a call's launches. A tuned program's too: its first call tunes (or reads the
    tuning cache) and its launches are kept like any other's (see _planned). Built and hashed
    on every call: flat, of ints and interned objects."""
    q = tensors[0]
    dtype = q.dtype
    key = (kind, program, extra, dtype, q.device, tiling._margins_version, hardware.chosen_by_user(),
           TMA, FLAT_DKDV, DIRECT_LAUNCH, DIRECT_LAUNCH_RAW, GQA_PACK, HEADS_FIRST, config.getenv("FLASHFX_TMA"),
           WS_FORWARD, config.getenv("FLASHFX_WS_FORWARD"), WS_BACKWARD, config.getenv("FLASHFX_WS_BACKWARD"),
           config.getenv("TRITON_INTERPRET"), dtype is torch.float32 and _precision(q))
    for t in tensors:
        key += (*t.shape, *t.stride())
    for x in operands:
        key += (*x.stride(), x.dtype)
    return key


def _planned(key, make: Callable[[TilePlan], Callable], run: Callable[[Callable], object], q, k, program, operands,
             kernels: tuple[str, ...], wanted: str = ""):
    """run(make(tiles)) with the plan's tiles, on a signature's first call; the call that ran is
    kept for the signature's later calls (the caller looks it up in `_recipes` first)."""
    made = []

    def attempt(tiles: TilePlan):
        call = make(tiles)
        result = run(call)
        made.append(call)
        return result

    result = tiling.run_planned(attempt, q, k, program, operands, kernels, wanted)
    # under CUDA graph capture tuning measures nothing (tiles.tuned): keep no untuned launches
    unsettled = program.autotune and q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not unsettled:
        if len(_recipes) >= _RECIPES_MAX:
            _recipes.clear()
        _recipes[key] = made[-1]
    return result


def forward(q, k, v, operands, program: ScoreProgram, tiles: TilePlan | None = None, seed=None):
    """(out [B, H, Nq, D], stats [program.stats_planes, B, H, Nq] fp32) via the forward kernel."""
    if tiles is not None:
        call = _forward_call(q, k, v, operands, program, tiles)
    else:
        key = _signature("fwd", program, (q, k, v), operands, FWD_SPLITS)
        call = _recipes.get(key)
    if call is not None:
        return call(q, k, v, operands, seed)
    # the signature's first call; autotune times the generated forward only where it runs
    return _planned(key, lambda p: _forward_call(q, k, v, operands, program, p),
                    lambda call: call(q, k, v, operands, seed), q, k, program, operands,
                    _generated_fwd(q, k, v, program, operands))


def _forward_call(q, k, v, operands, program: ScoreProgram, p: TilePlan) -> Callable:
    """The forward of every call of this one's signature, as a function of the call's tensors:
    the launches with their grids and compile-time arguments, and the integer arguments (strides
    and sizes, which the signature fixes), made once."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    t = p.fwd
    kernels = _kernels(program)
    pack, grid, splits = _fwd_grid(q, k, t)
    dpad = p.head_dim_pad
    fwd = _launch(kernels._attn_fwd, grid + (splits,), (k, v), t.block_n,
                  dpad, GROUP=H // Hk, CAUSAL=_CAUSAL_CODE[program.causal], HEAD_DIM=D,
                  HEAD_DIM_PAD=dpad, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                  PRECISION=_precision(q), SPLITS=splits, PACK=pack,
                  num_warps=t.num_warps, num_stages=t.num_stages)
    ws, ws_ints = _ws_launch(q, k, v, program) if splits == 1 and _ws_fwd_takes(q, k, v, program) else (None, ())
    combine = None
    if splits > 1:
        combine = _launch(kernels._attn_fwd_combine, (triton_cdiv(Nq, t.block_m), B * H), SPLITS=splits, HEAD_DIM=D,
                          HEAD_DIM_PAD=dpad, BLOCK_M=t.block_m)
    # out is empty_like(q): its strides follow from q's, which the signature fixes
    out_strides = torch.empty_like(q, device="meta").stride()
    ints = (*q.stride(), *k.stride(), *v.stride(), *out_strides, *_strides(operands), H, Nq, Nk, B * H * Nq)
    sizes = (*out_strides, H, Nq, B * H * Nq)
    # fp64 for fp64 inputs, as the op's fake implementation promises (the kernel computes fp32)
    stats_shape = (program.stats_planes, B, H, Nq)
    stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    def call(q, k, v, operands, seed):
        out = torch.empty_like(q)
        stats = torch.empty(stats_shape, device=q.device, dtype=stats_dtype)
        if combine is None:
            part_o, part_stats = out, stats  # not read: the kernel writes out and stats itself
        else:
            part_o = torch.empty((splits, B * H, Nq, dpad), device=q.device, dtype=torch.float32)
            part_stats = torch.empty((2, splits, B * H, Nq), device=q.device, dtype=torch.float32)
        if ws is not None and _aligned(q, k, v):
            ws(q, k, v, out, stats, *ws_ints)
            return out, stats
        fwd.reads(k, v)(q, k, v, out, stats, k, v, part_o, part_stats, *_seed_args(program, seed), *operands, *ints)
        if combine is not None:
            combine.ptr(part_o, part_stats, out, stats, *sizes)
        return out, stats

    # what a call with aligned tensors launches (unaligned ones fall back to the generated forward)
    call.launches = (_Launch(ws),) if ws is not None else (fwd,) if combine is None else (fwd, combine)
    call.warp_specialized = ws is not None
    return call


def _fwd_grid(q, k, t) -> tuple[bool, tuple, int]:
    """(GQA heads packed into tiles, grid, key-range parts) of the generated forward with tiles t."""
    B, H, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    pack = packs(H // Hk, Nq, t.block_m)
    grid = (triton_cdiv(H // Hk * Nq, t.block_m), B * Hk) if pack else (triton_cdiv(Nq, t.block_m), B * H)
    return pack, grid, forward_splits(grid[0] * grid[1], Nk, t.block_n, q.device)


def _ws_fwd_takes(q, k, v, program: ScoreProgram) -> bool:
    """Whether the warp-specialized forward covers this signature (its aligned calls, when the
    key range is not split): it covers the program, and the copy engine can read q, k, v and
    the output."""
    B, H, Nq, D = q.shape
    if ws_forward(program, q.dtype, q.device, D, Nq, k.shape[2], B * H) is not None:
        return False
    return all(_tma_layout_ok(t) for t in (q, k, v, torch.empty_like(q, device="meta")))


def _generated_fwd(q, k, v, program: ScoreProgram, operands) -> tuple[str, ...]:
    """("fwd",) unless the warp-specialized forward runs this signature's aligned calls at the
    planner's tiles (no split key range): then every tile candidate would time that kernel."""
    if not _ws_fwd_takes(q, k, v, program):
        return ("fwd",)
    return () if _fwd_grid(q, k, tiling.for_call(q, k, program, operands).fwd)[2] == 1 else ("fwd",)


def _ws_launch(q, k, v, program: ScoreProgram) -> tuple["_Kernel | None", tuple]:
    """The warp-specialized forward's launch for this signature (codegen.hopper) and the
    integers that follow its tensors (see _ws_fwd_takes, which must hold)."""
    B, H, Nq, D = q.shape
    out = torch.empty_like(q, device="meta")
    Hk, Nk = k.shape[1], k.shape[2]
    descs = _row_boxes(hopper.attn_fwd, D, QDesc=(q, hopper.BLOCK_M), KDesc=(k, hopper.BLOCK_N),
                       VDesc=(v, hopper.BLOCK_N), ODesc=(out, hopper.BLOCK_M))
    programs, walk = hopper.schedule(B * H, Nq, tiling.gpu_of(q.device).sm_count)
    qk_scale = program.ops[0].const * codegen.LOG2E  # exp2 units
    return (_Kernel(hopper.attn_fwd, (programs,), hopper.constexprs(D, _CAUSAL_CODE[program.causal]), descs,
                    describe=hopper.describe), (H, H // Hk, *walk, Nq, Nk, qk_scale))


def _row_boxes(kernel, head_dim: int, **at) -> tuple:
    """The descriptor entries of a Gluon kernel's 4-D tensors: {parameter: (tensor, rows)}, each
    read in [1, 1, rows, head_dim] boxes (see _Kernel)."""
    return tuple((kernel.arg_names.index(n), *_geometry(t), [1, 1, rows, head_dim]) for n, (t, rows) in at.items())


def _strides(operands) -> list:
    return [s for x in operands for s in x.stride()]  # each a 4-D view broadcast to [B, H, Nq, Nk]


def backward(dout, q, k, v, out, stats, operands, program: ScoreProgram, tiles: TilePlan | None = None,
             operand_grads: dict[int, tuple] | None = None, seed=None):
    """(dq, dk, dv): recomputes P tile by tile from Q, K and the saved row statistics.

    operand_grads: {operand index: 4-D shape} for operands that require grad; then returns
    (dq, dk, dv, {index: gradient of that shape, fp32}). The dQ kernel, which visits every
    score once, writes dL/dx per score into an fp32 [B, H, Nq, Nk] buffer (zero where blocks
    are skipped), summed here over the operand's broadcast dimensions: deterministic, and as
    large as the scores only while a bias that requires grad is being differentiated.
    """
    wanted = tuple(sorted(operand_grads or {}))
    if tiles is not None:
        call = _backward_call(dout, q, k, v, out, stats, operands, program, wanted, tiles)
    else:
        key = _signature("bwd", program, (q, k, v, dout, out), operands, tuple(sorted((operand_grads or {}).items())))
        call = _recipes.get(key)
    if call is not None:
        dq, dk, dv, d_bufs = call(dout, q, k, v, out, stats, operands, seed)
    else:  # the signature's first call
        dq, dk, dv, d_bufs = _planned(
            key, lambda p: _backward_call(dout, q, k, v, out, stats, operands, program, wanted, p),
            lambda call: call(dout, q, k, v, out, stats, operands, seed), q, k, program, operands,
            # autotune times only the generated kernels that run, not those the Gluon ones replace
            _generated_bwd(q, k, v, dout, out, program, wanted),
            "+grad" + ",".join(map(str, wanted)) if wanted else "")
    if operand_grads is None:
        return dq, dk, dv
    d_ops = {}
    for i, buf in zip(wanted, d_bufs):
        shape = operand_grads[i]
        dims = [d for d in range(4) if shape[d] == 1 and buf.shape[d] != 1]
        d_ops[i] = buf.sum(dims, keepdim=True) if dims else buf
    return dq, dk, dv, d_ops


def _backward_call(dout, q, k, v, out, stats, operands, program: ScoreProgram, wanted: tuple,
                   p: TilePlan) -> Callable:
    """The backward of every call of this one's signature (see _forward_call)."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    kernels = _kernels(program, wanted)
    common = dict(GROUP=H // Hk, CAUSAL=_CAUSAL_CODE[program.causal], HEAD_DIM=D,
                  HEAD_DIM_PAD=p.head_dim_pad, PRECISION=_precision(q))
    first_dkdv, first_dq = (heads_first(kern, q, k, program) for kern in ("dkdv", "dq"))
    t = p.bwd_dkdv
    l_dkdv = _launch(kernels._attn_bwd_dkdv, _order((triton_cdiv(Nk, t.block_n), B * Hk), first_dkdv), (q, dout),
                     t.block_m, p.head_dim_pad, **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                     FLAT=_flat_dkdv(p.head_dim_pad, program.causal is not None, H // Hk, t.keys_down),
                     KEYS_DOWN=t.keys_down, HEADS_FIRST=first_dkdv,
                     num_warps=t.num_warps, num_stages=t.num_stages)
    t = p.bwd_dq
    l_dq = _launch(kernels._attn_bwd_dq, _order((triton_cdiv(Nq, t.block_m), B * H), first_dq), (k, v), t.block_n,
                   p.head_dim_pad, **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEADS_FIRST=first_dq,
                   num_warps=t.num_warps, num_stages=t.num_stages)
    # dq, dk, dv are empty_like(q, k, v): the strides the fake implementation promises
    dq_s, dk_s, dv_s = (torch.empty_like(x, device="meta").stride() for x in (q, k, v))
    inputs = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    tail = (*_strides(operands), H, Nq, Nk, B * H * Nq)
    dq_ints = (*inputs, *out.stride(), *dq_s, *tail)
    dkdv_ints = (*inputs, *dk_s, *dv_s, *tail)
    device = q.device
    ws, ws_ints = None, ()
    if _ws_dkdv_takes(q, k, v, dout, program, wanted):
        ws, ws_ints = _ws_dkdv_launch(q, k, v, dout, program, dk_s, dv_s, first_dkdv)
    ws_dq_, ws_dq_ints = None, ()
    if _ws_dq_takes(q, k, v, dout, out, program, wanted):
        ws_dq_, ws_dq_ints = _ws_dq_launch(q, k, v, dout, out, program, dq_s, first_dq)

    def call(dout, q, k, v, out, stats, operands, seed):
        d_bufs = [torch.zeros((B, H, Nq, Nk), device=device, dtype=torch.float32) for _ in wanted]
        dx_args = [a for buf in d_bufs for a in (buf, *buf.stride())]
        delta = torch.empty((B, H, Nq), device=device, dtype=torch.float32)
        dq = torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        seeds = _seed_args(program, seed)
        # the Gluon kernels read the statistics as rows and take the copy engine's 16-byte addresses
        gluon_ok = (ws is not None or ws_dq_ is not None) and _aligned(q, k, v, dout) and stats.is_contiguous()
        # dQ first: it also writes Δ = rowsum(dO ∘ O), which dK/dV reads
        if ws_dq_ is not None and gluon_ok:
            ws_dq_(q, k, v, dout, out, stats, delta, dq, *ws_dq_ints)
        else:
            l_dq.reads(k, v)(q, k, v, dout, out, stats, delta, dq, k, v, *seeds, *operands, *dx_args, *dq_ints)
        if ws is not None and gluon_ok:
            ws(q, k, v, dout, stats, delta, dk, dv, *ws_ints)
        else:
            l_dkdv.reads(q, dout)(q, k, v, dout, stats, delta, dk, dv, q, dout, *seeds, *operands, *dkdv_ints)
        return dq, dk, dv, d_bufs

    # what a call with aligned tensors launches (unaligned ones fall back to the generated kernels)
    call.launches = ((_Launch(ws_dq_) if ws_dq_ is not None else l_dq),
                     (_Launch(ws) if ws is not None else l_dkdv))
    call.warp_specialized_dkdv = ws is not None
    call.warp_specialized_dq = ws_dq_ is not None
    return call


def _generated_bwd(q, k, v, dout, out, program: ScoreProgram, wanted: tuple) -> tuple[str, ...]:
    """The generated backward kernels an aligned call of this signature runs."""
    return tuple(kern for kern, gluon_takes in (("dkdv", _ws_dkdv_takes(q, k, v, dout, program, wanted)),
                                                ("dq", _ws_dq_takes(q, k, v, dout, out, program, wanted)))
                 if not gluon_takes)


def _ws_dq_takes(q, k, v, dout, out, program: ScoreProgram, wanted: tuple) -> bool:
    """Whether the warp-specialized dQ computes this signature's dQ and Δ (aligned calls with
    contiguous statistics): it covers the program, no operand gradient is wanted, the copy engine
    can read q, k, v and dO, and O's rows have unit stride."""
    B, H, Nq, D = q.shape
    return (not wanted and ws_dq(program, q.dtype, q.device, D, Nq, k.shape[2]) is None and out.stride(3) == 1
            and all(_tma_layout_ok(t) for t in (q, k, v, dout)))


def _ws_dq_launch(q, k, v, dout, out, program: ScoreProgram, dq_strides,
                  first: bool = False) -> tuple["_Kernel", tuple]:
    """The warp-specialized dQ's launch for this signature (codegen.hopper_bwd.attn_bwd_dq) and
    the integers that follow its tensors (see _ws_dq_takes). It reads O and the log-sum-exp
    plane through pointers and writes Δ as [B·H, Nq] rows."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    assert dq_strides[3] == 1, dq_strides
    descs = _row_boxes(hopper_bwd.attn_bwd_dq, D, QDesc=(q, hopper_bwd.DQ_BLOCK_M),
                       KDesc=(k, hopper_bwd.DQ_BLOCK_N), VDesc=(v, hopper_bwd.DQ_BLOCK_N),
                       dODesc=(dout, hopper_bwd.DQ_BLOCK_M))
    scale = program.ops[0].const
    return (_Kernel(hopper_bwd.attn_bwd_dq, _order(hopper_bwd.dq_grid(Nq, B * H), first),
                    hopper_bwd.dq_constexprs(D, _CAUSAL_CODE[program.causal], first), descs,
                    describe=hopper_bwd.describe),
            (*out.stride()[:3], *dq_strides[:3], H, H // Hk, Nq, Nk, scale * codegen.LOG2E, scale))


def _ws_dkdv_takes(q, k, v, dout, program: ScoreProgram, wanted: tuple) -> bool:
    """Whether the warp-specialized dK/dV computes this signature's dK and dV (aligned calls):
    it covers the program, no operand gradient is wanted, and the copy engine can read q, k, v
    and dO (dK and dV, empty_like(k) and (v), then have rows of unit stride too)."""
    B, H, Nq, D = q.shape
    return (not wanted and ws_backward(program, q.dtype, q.device, D, Nq, k.shape[2]) is None
            and all(_tma_layout_ok(t) for t in (q, k, v, dout)))


def _ws_dkdv_launch(q, k, v, dout, program: ScoreProgram, dk_strides, dv_strides,
                    first: bool = False) -> tuple["_Kernel", tuple]:
    """The warp-specialized dK/dV's launch for this signature (codegen.hopper_bwd) and the
    integers that follow its tensors (see _ws_dkdv_takes). Its row statistics, the forward's
    log-sum-exp plane and Δ, are read as [B·H, Nq] rows."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    assert dk_strides[3] == 1 and dv_strides[3] == 1, (dk_strides, dv_strides)
    kernel = hopper_bwd.attn_bwd_dkdv
    descs = _row_boxes(kernel, D, QDesc=(q, hopper_bwd.BLOCK_M), KDesc=(k, hopper_bwd.BLOCK_K),
                       VDesc=(v, hopper_bwd.BLOCK_K), dODesc=(dout, hopper_bwd.BLOCK_M))
    descs += tuple((kernel.arg_names.index(n), [B * H, Nq], [Nq, 1], [1, hopper_bwd.BLOCK_M])
                   for n in ("LseDesc", "DeltaDesc"))
    scale = program.ops[0].const
    return (_Kernel(kernel, _order(hopper_bwd.grid(Nk, B * Hk), first),
                    hopper_bwd.constexprs(D, _CAUSAL_CODE[program.causal], first), descs,
                    describe=hopper_bwd.describe),
            (*dk_strides[:3], *dv_strides[:3], H, H // Hk, Nq, Nk, scale * codegen.LOG2E, scale))


# The backward's program order: None chooses (cost.heads_first, on CUDA); True or False forces.
HEADS_FIRST: bool | None = None


def heads_first(kernel: str, q: torch.Tensor, k: torch.Tensor, program: ScoreProgram) -> bool:
    """Whether the backward `kernel` ("dkdv" or "dq") of a call like this one starts its programs
    heads first (cost.heads_first: under a causal mask, where the streamed tensors fit in L2)."""
    return heads_first_for(kernel, call_shape(q.shape, k.shape, q.element_size(), program), q.device)


def call_shape(q_shape, k_shape, elt: int, program: ScoreProgram) -> cost.Shape:
    """The cost model's shape of a call with these q and k shapes (the exact head dim: the
    warp-specialized kernels' model and the backward's order take it unpadded)."""
    (B, H, Nq, D), (_, Hk, Nk, _) = q_shape, k_shape
    return cost.Shape(Nq, Nk, D, elt, program.causal is not None, H // Hk, B * H)


def heads_first_for(kernel: str, shape: cost.Shape, device: torch.device) -> bool:
    """heads_first for a call of this shape on `device` (what explain reports)."""
    if HEADS_FIRST is not None:
        return HEADS_FIRST
    if device.type != "cuda" or tiling.interpreting():
        return False
    return cost.heads_first(kernel, shape, tiling.gpu_of(device))


def _order(grid: tuple[int, int], first: bool) -> tuple[int, int]:
    """A backward grid (blocks, heads) as launched. The GPU starts programs in grid order, the
    first axis fastest: (blocks, heads) starts a head's blocks in turn, then the next head's;
    heads first, (heads, blocks), every head's first block, then every head's second, so that
    under a causal mask the longest programs start first (the kernels read the axes by their
    HEADS_FIRST constexpr)."""
    return grid[::-1] if first else grid


def packs(group: int, n_q: int, block_m: int) -> bool:
    """Whether the forward packs a GQA group's query heads into the rows of its tiles: when a
    head's queries fill less than one tile (decoding, short prompts), so that the group's K/V
    blocks are read once instead of once per query head, and the tile's rows are not mostly
    padding. Longer query ranges fill their tiles anyway and keep one head per program, whose
    causal block skipping is exact. GQA_PACK forces it on or off.

    The planner does not model packing yet: it plans the tiles as for one head per tile."""
    if GQA_PACK is not None:
        return GQA_PACK and group > 1
    return group > 1 and n_q < block_m


def forward_splits(programs: int, n_k: int, block_n: int, device: torch.device) -> int:
    """Parts of the key range a forward of `programs` (query blocks × batch·heads) runs in."""
    if FWD_SPLITS is not None:
        return FWD_SPLITS
    if device.type != "cuda" or tiling.interpreting():
        return 1
    return kv_splits(programs, n_k, block_n, tiling.gpu_of(device).sm_count)


def _flat_dkdv(head_dim_pad: int, causal: bool = False, group: int = 1, keys_down: bool = False) -> bool:
    """Measured on the H200 (whole backward): the flattened loop is faster at head dim 256
    (GQA4 by 5-20%, causal MHA by 5-8%), nested loops at 64 (by 0-4%) and at 128 (full MHA by
    3%, causal GQA4 by 17%), except queries-down 64x64 tiles in causal MHA at 128, where the
    flattened loop is 2-3.5% faster (N = 1024 to 16384): ptxas (sm_90) spills 380 bytes a thread
    from their nested loops with 2 stages, and 4 from the flattened one. Keys down at 128 (32x64
    tiles, 4 warps, 3 stages: the plan's choice for causal MHA), nested loops are faster in every
    family measured: by 2-5% in causal MHA, 1.5% in full MHA, 4% in causal GQA4."""
    if FLAT_DKDV is not None:
        return FLAT_DKDV
    return head_dim_pad > 128 or (head_dim_pad == 128 and causal and group == 1 and not keys_down)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
