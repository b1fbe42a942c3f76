"""What Triton makes of the generated kernels for Hopper (sm_90), compiled here without a GPU.

These check properties that the interpreter cannot see and that cost time on the GPU. The
compile runs in a child process: this one's Triton may be in interpreter mode, and the two
modes do not mix in one process.
"""

import functools
import re

import pytest

from flashfx.ir import ScoreOp, ScoreProgram
from tests.compiled import in_child

pytest.importorskip("triton")


@functools.lru_cache(maxsize=None)  # a compile takes seconds: tests asking alike share it
def _dkdv_ttgir(prog: ScoreProgram, head_dim: int = 64, tma: bool = True, keys_down: bool = False) -> str:
    """The dK/dV kernel's TTGIR for sm_90, from a child process without TRITON_INTERPRET."""
    result = in_child("tests.codegen.test_hopper_ir:compile_dkdv", prog.encode(), head_dim, tma, keys_down)
    if result is None:
        pytest.skip("this Triton has no NVIDIA backend")
    return result


def compile_dkdv(program: str, head_dim: int, tma: bool, keys_down: bool = False) -> str | None:
    """(In the child.) Compile the dK/dV kernel as a launch on contiguous bf16 tensors would."""
    from triton.backends import backends

    from benchmarks.sm90_registers import compile_sm90

    if "nvidia" not in backends:
        return None
    return compile_sm90("dkdv", program, head_dim, 64, 64, 4, 2, tma=tma, keys_down=keys_down).asm["ttgir"]


def _loops(ttgir: str) -> list[str]:
    """The body of each scf.for loop in the kernel, up to the loop's closing brace."""
    bodies = []
    for part in ttgir.split("scf.for")[1:]:
        body, depth = [], 0
        for line in part.splitlines()[1:]:
            depth += line.count("{") - line.count("}")
            if depth < 0:
                break
            body.append(line)
        bodies.append("\n".join(body))
    return bodies


@pytest.mark.parametrize("keys_down", [False, True], ids=["queries_down", "keys_down"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_dkdv_key_loops_are_pipelined(tma, keys_down):
    # the next Q and dO tiles are in flight while this one computes. A `while` loop or a
    # tl.debug_barrier() in the loop body can silently stop Triton from pipelining it
    prog = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    loops = [b for b in _loops(_dkdv_ttgir(prog, tma=tma, keys_down=keys_down)) if "warp_group_dot" in b]
    assert loops, "no key loop with Hopper matrix products"
    for body in loops:
        assert len(re.findall(r"warp_group_dot ", body)) == 4  # QKᵀ, dO·Vᵀ, dV, dK
        assert "async_tma_copy_global_to_local" in body or "async_copy_global_to_local" in body, body


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_dkdv_products_take_p_and_ds_from_registers(tma):
    # keys down, the dK/dV kernel computes K·Qᵀ, so P and dS come out of their products in the layout that
    # dV += P·dO and dK += dS·Q read them in: no tile goes to shared memory to be transposed
    # (a register tensor stored to shared memory is a `local_alloc %value`)
    prog = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    loops = [b for b in _loops(_dkdv_ttgir(prog, tma=tma, keys_down=True)) if "warp_group_dot" in b]
    assert loops, "no key loop with Hopper matrix products"
    for body in loops:
        assert not re.search(r"local_alloc %", body), body


@pytest.mark.parametrize("keys_down", [False, True], ids=["queries_down", "keys_down"])
def test_dkdv_full_blocks_read_row_statistics_as_they_are(keys_down):
    # the run of query blocks that see the whole key block reads lse and Δ without bounds
    # masks and, under a program that masks nothing by value, without the fix-up for rows that
    # saw no key (a compare and a select per statistic; with keys down each thread holds a
    # dozen statistics of a tile, and the loop lost 40% of its SASS instructions to them)
    prog = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    loops = [b for b in _loops(_dkdv_ttgir(prog, tma=True, keys_down=keys_down)) if "warp_group_dot" in b]
    assert len(loops) == 3  # the diagonal run (masked), the full run, the ragged end (masked)
    assert ["arith.cmpf" in b for b in loops] == [True, False, True]
