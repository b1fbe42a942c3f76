"""Process-wide settings (per-compile options arrive through torch.compile(options=...))."""

import os

# Which implementation runs the op on CPU tensors: "chunked" (the memory-efficient torch
# path) or "triton" (the generated GPU kernels under TRITON_INTERPRET=1: how CI tests them).
cpu_kernel: str = os.environ.get("FLASHFX_CPU_KERNEL", "chunked")

# Print each pass's summary while compiling.
debug: bool = os.environ.get("FLASHFX_DEBUG", "0") == "1"

# Rewrite at most this many attention sites per graph (None: all). Bisects a numerics bug
# to one site: FLASHFX_MAX_REWRITES=0, 1, 2, ...
max_rewrites: int | None = (
    int(os.environ["FLASHFX_MAX_REWRITES"]) if os.environ.get("FLASHFX_MAX_REWRITES") else None
)
