"""What the planner needs to know about a GPU: read from the device, a table, or the user.

A `GPU` is plain data. Three ways to get one:

    hardware.current()          the CUDA device present: what the driver reports (SM count,
                                shared memory, registers, L2, clocks) merged with the table
                                entry of the same name for what it cannot report (matrix
                                throughput, HBM bandwidth on older torch)
    hardware.KNOWN["A10"]       a GPU that is not present, from the table below: pass it to
                                `plan(...)` to see the plan flashfx would make there
    hardware.override("L4")     make `current()` answer for another GPU (or a modified one:
                                `override(KNOWN["H100"], sm_count=114)`), e.g. to test plans
                                for a smaller GPU on a large one; `override(None)` undoes it.
                                The environment variable FLASHFX_GPU=<table name> does the same.

Per-architecture limits (shared memory per SM, registers, threads and blocks per SM, the
special-function and fp32 issue rates) come from the CUDA C++ Programming Guide's tables of
compute capabilities; per-product figures (SMs, clocks, HBM bandwidth, dense matrix TFLOP/s,
L2 size) from the vendor's data sheets. Matrix throughput is dense (no 2:4 sparsity), with
fp32 accumulation, the way the attention kernels use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache

from flashfx import config

KiB = 1024


@dataclass(frozen=True)
class Arch:
    """Limits shared by every GPU of one compute capability (CUDA programming guide)."""

    smem_per_sm: int  # bytes of shared memory per SM (the carve-out maximum)
    smem_per_block: int  # bytes one block (CTA) may opt in to
    regs_per_sm: int  # 32-bit registers per SM
    max_threads_per_sm: int
    max_blocks_per_sm: int
    sfu_per_clk: int  # exp2/log2/rcp results per clock per SM (special-function units)
    fp32_per_clk: int  # fp32 add/mul/fma results per clock per SM
    wgmma: bool  # warp-group MMA (Hopper and later): the held MMA operand is read from SRAM


ARCHS = {
    (8, 0): Arch(164 * KiB, 163 * KiB, 65536, 2048, 32, 16, 64, False),
    (8, 6): Arch(100 * KiB, 99 * KiB, 65536, 1536, 16, 16, 128, False),
    (8, 7): Arch(164 * KiB, 163 * KiB, 65536, 1536, 16, 16, 128, False),
    (8, 9): Arch(100 * KiB, 99 * KiB, 65536, 1536, 24, 16, 128, False),
    (9, 0): Arch(228 * KiB, 227 * KiB, 65536, 2048, 32, 16, 128, True),
    (10, 0): Arch(228 * KiB, 227 * KiB, 65536, 2048, 32, 16, 128, True),
    (12, 0): Arch(100 * KiB, 99 * KiB, 65536, 1536, 32, 16, 128, False),
}


def arch(capability: tuple[int, int]) -> Arch:
    """The limits of `capability`, or of the nearest older one the table knows."""
    known = [c for c in ARCHS if c <= tuple(capability)]
    return ARCHS[max(known)] if known else ARCHS[(8, 0)]


@dataclass(frozen=True)
class GPU:
    """One GPU as the cost model sees it. Sizes in bytes, rates per second unless named."""

    name: str
    capability: tuple[int, int]
    smem_per_block: int  # bytes one program (CTA) may use, opt-in maximum
    sm_count: int
    smem_per_sm: int = 0  # 0: the architecture's
    regs_per_sm: int = 0  # 32-bit registers; 0: the architecture's
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 0  # 0: the architecture's
    max_blocks_per_sm: int = 0  # 0: the architecture's
    clock_hz: float = 1.5e9  # SM clock under sustained load
    hbm_bytes_per_s: float = 1.0e12
    l2_bytes: int = 40 * 1024 * KiB
    # dense matrix throughput with fp32 accumulation, FLOP/s, per input type
    matmul_flops: tuple[tuple[str, float], ...] = (("bf16", 100e12), ("fp16", 100e12),
                                                   ("tf32", 50e12), ("fp32", 20e12))

    def __post_init__(self):
        a = arch(self.capability)
        for f, v in (("smem_per_sm", a.smem_per_sm), ("regs_per_sm", a.regs_per_sm),
                     ("max_threads_per_sm", a.max_threads_per_sm),
                     ("max_blocks_per_sm", a.max_blocks_per_sm)):
            if not getattr(self, f):
                object.__setattr__(self, f, v)
        object.__setattr__(self, "capability", tuple(self.capability))

    @property
    def arch(self) -> Arch:
        return arch(self.capability)

    def flops(self, dtype: str) -> float:
        """Dense matrix FLOP/s for inputs of `dtype` ("bf16", "fp16", "tf32", "fp32")."""
        return dict(self.matmul_flops)[dtype]


def _gpu(name, cc, sms, clock_ghz, hbm_tb_s, l2_mib, bf16_tflops, fp32_tflops, **kw) -> GPU:
    a = arch(cc)
    return GPU(
        name, cc, kw.pop("smem_per_block", a.smem_per_block), sms, clock_hz=clock_ghz * 1e9,
        hbm_bytes_per_s=hbm_tb_s * 1e12, l2_bytes=int(l2_mib * 1024 * KiB),
        matmul_flops=(("bf16", bf16_tflops * 1e12), ("fp16", bf16_tflops * 1e12),
                      ("tf32", bf16_tflops / 2 * 1e12), ("fp32", fp32_tflops * 1e12)),
        **kw,
    )


# name: (capability, SMs, sustained SM clock GHz, HBM TB/s, L2 MiB, dense bf16 TFLOP/s with
#        fp32 accumulation, fp32 (non-tensor) TFLOP/s). Keys are matched against the driver's
#        device name as whole words ("A10" does not match "A100"); the longest match wins.
KNOWN = {
    "A100": _gpu("A100", (8, 0), 108, 1.41, 2.04, 40, 312, 19.5),  # SXM4 80 GB
    "A100 PCIe 40GB": _gpu("A100 PCIe 40GB", (8, 0), 108, 1.41, 1.56, 40, 312, 19.5),
    "A10": _gpu("A10", (8, 6), 72, 1.695, 0.60, 6, 125, 31.2),
    "L4": _gpu("L4", (8, 9), 58, 2.04, 0.30, 48, 121, 30.3),
    # GeForce Ada runs bf16 MMA with fp32 accumulation at half the fp16-accumulate rate
    "RTX 4090": _gpu("RTX 4090", (8, 9), 128, 2.52, 1.008, 72, 165, 82.6),
    "H100": _gpu("H100", (9, 0), 132, 1.83, 3.35, 50, 989, 67),  # SXM5
    "H100 PCIe": _gpu("H100 PCIe", (9, 0), 114, 1.755, 2.0, 50, 756, 51),
    "H200": _gpu("H200", (9, 0), 132, 1.83, 4.8, 50, 989, 67),
    "B200": _gpu("B200", (10, 0), 148, 1.86, 8.0, 126, 2250, 80),
}

# The Triton interpreter runs on the CPU; it has no shared memory to exhaust.
INTERPRETER = GPU("triton-interpreter", (0, 0), 1 << 30, 1, smem_per_sm=1 << 30)


def lookup(device_name: str) -> GPU | None:
    """The table entry whose key names `device_name` (e.g. "NVIDIA H100 80GB HBM3"), if any."""
    up = device_name.upper()
    hits = [k for k in KNOWN if re.search(r"(?<![A-Z0-9])" + re.escape(k.upper()) + r"(?![A-Z0-9])", up)]
    return KNOWN[max(hits, key=len)] if hits else None


# ---------------------------------------------------------------------------------------------
# The device present, or the one the user asked the planner to plan for
# ---------------------------------------------------------------------------------------------

_override: GPU | None = None


def override(gpu: GPU | str | None, **changes) -> GPU | None:
    """Make `current()` answer `gpu` (a GPU, or a KNOWN name) with `changes` applied.

    override("A10")                          plan as if on an A10
    override(KNOWN["H100"], sm_count=114)    a modified table entry
    override(None)                           back to the device present
    Returns the previous override, so that callers can restore it.
    """
    global _override
    previous = _override
    if isinstance(gpu, str):
        if gpu not in KNOWN:
            raise KeyError(f"flashfx: unknown GPU {gpu!r}; known: {', '.join(sorted(KNOWN))}")
        gpu = KNOWN[gpu]
    _override = dataclasses.replace(gpu, **changes) if gpu is not None else None
    return previous


@contextlib.contextmanager
def overridden(gpu: GPU | str, **changes):
    """`with hardware.overridden("L4"): ...` plans for an L4 inside the block."""
    previous = override(gpu, **changes)
    try:
        yield _override
    finally:
        override(previous)


def chosen_by_user() -> GPU | None:
    """The override, else the table entry FLASHFX_GPU names, else None (plan for the device)."""
    if _override is not None:
        return _override
    env = config.getenv("FLASHFX_GPU")
    if env:
        if env not in KNOWN:
            raise KeyError(f"flashfx: FLASHFX_GPU={env!r} is not one of {', '.join(sorted(KNOWN))}")
        return KNOWN[env]
    return None


def current(device=None) -> GPU:
    """The GPU the planner plans for: the override if any, else CUDA device `device`."""
    chosen = chosen_by_user()
    if chosen is not None:
        return chosen
    import torch

    if device is None:
        device = torch.cuda.current_device()
    return from_properties(torch.cuda.get_device_properties(device))


@lru_cache(maxsize=None)
def _from_properties(props_key: tuple) -> GPU:
    (name, major, minor, sms, smem_block, smem_sm, regs, threads, l2, clock_khz,
     mem_khz, bus_bits) = props_key
    cc = (major, minor)
    a = arch(cc)
    known = lookup(name)
    # what the driver reports wins; the table (or the architecture) fills what it does not
    base = known if known is not None and known.capability == cc else None
    fields = dict(
        name=name, capability=cc, sm_count=sms,
        smem_per_block=smem_block or (base.smem_per_block if base else a.smem_per_block),
        smem_per_sm=smem_sm or (base.smem_per_sm if base else a.smem_per_sm),
        regs_per_sm=regs or a.regs_per_sm,
        max_threads_per_sm=threads or a.max_threads_per_sm,
        max_blocks_per_sm=a.max_blocks_per_sm,
    )
    if l2:
        fields["l2_bytes"] = l2
    if base is not None:
        # sustained clock and matrix throughput are product figures the driver does not give
        fields.update(clock_hz=base.clock_hz, hbm_bytes_per_s=base.hbm_bytes_per_s,
                      matmul_flops=base.matmul_flops)
        return dataclasses.replace(base, **fields)
    # an unknown product: scale the nearest table entry of its architecture by SMs and clock
    same = [g for g in KNOWN.values() if g.capability[0] == major] or [KNOWN["A100"]]
    ref = min(same, key=lambda g: abs(g.sm_count - sms))
    clock = clock_khz * 1e3 if clock_khz else ref.clock_hz
    scale = sms * clock / (ref.sm_count * ref.clock_hz)
    hbm = 2 * mem_khz * 1e3 * bus_bits / 8 if mem_khz and bus_bits else ref.hbm_bytes_per_s
    return GPU(**fields, clock_hz=clock, hbm_bytes_per_s=hbm,
               matmul_flops=tuple((k, v * scale) for k, v in ref.matmul_flops))


def from_properties(props) -> GPU:
    """A GPU from torch.cuda.get_device_properties(...); attributes newer torch adds are optional."""
    g = lambda attr: int(getattr(props, attr, 0) or 0)  # noqa: E731
    return _from_properties((
        props.name, props.major, props.minor, props.multi_processor_count,
        g("shared_memory_per_block_optin"), g("shared_memory_per_multiprocessor"),
        g("regs_per_multiprocessor"), g("max_threads_per_multi_processor"), g("L2_cache_size"),
        g("clock_rate"), g("memory_clock_rate"), g("memory_bus_width"),
    ))
