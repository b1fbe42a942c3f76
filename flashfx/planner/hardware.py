"""What the planner needs to know about a GPU, read from the device or from a table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    smem_per_block: int  # bytes one program (CTA) may use, opt-in maximum
    sm_count: int


# Opt-in shared memory per block, from the CUDA programming guide's per-architecture tables.
KNOWN = {
    "A100": GPU("A100", (8, 0), 163 * 1024, 108),
    "A10": GPU("A10", (8, 6), 99 * 1024, 72),
    "L4": GPU("L4", (8, 9), 99 * 1024, 58),
    "RTX 4090": GPU("RTX 4090", (8, 9), 99 * 1024, 128),
    "H100": GPU("H100", (9, 0), 227 * 1024, 132),
    "H200": GPU("H200", (9, 0), 227 * 1024, 132),
}

# The Triton interpreter runs on the CPU; it has no shared memory to exhaust.
INTERPRETER = GPU("triton-interpreter", (0, 0), 1 << 30, 1)


def current(device=None) -> GPU:
    """The GPU `device` (a CUDA device) as the planner sees it, read from the driver."""
    import torch

    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:  # older torch: fall back to the table by name
        smem = next((g.smem_per_block for k, g in KNOWN.items() if k in props.name), 99 * 1024)
    return GPU(props.name, (props.major, props.minor), smem, props.multi_processor_count)
