"""Process-wide settings (per-compile options arrive through torch.compile(options=...))."""

import os

# os.environ.get of an absent name raises and catches a KeyError inside the mapping: about a
# microsecond, and the op's launch path reads three names per call. The mapping keeps its
# variables in a dict of encoded names (CPython, POSIX); read that, else the mapping itself.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str) -> str | None:
    """os.environ.get(name), as the environment is now (a change made through os.environ
    shows), without the cost of a miss."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    return None if value is None else os.fsdecode(value)


_ENV_KEYS: dict[str, bytes] = {}


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
