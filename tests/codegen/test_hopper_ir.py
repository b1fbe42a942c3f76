"""What Triton makes of the generated kernels for Hopper (sm_90), compiled here without a GPU.

These check properties that the interpreter cannot see and that cost time on the GPU. The
compile runs in a child process: this one's Triton may be in interpreter mode, and the two
modes do not mix in one process.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from flashfx.codegen import attention as codegen
from flashfx.ir import ScoreOp, ScoreProgram

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dkdv_ttgir(prog: ScoreProgram, head_dim: int = 64, tma: bool = True) -> str:
    """The dK/dV kernel's TTGIR for sm_90, from a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys, json; from tests.codegen.test_hopper_ir import compile_dkdv; "
            "print(json.dumps(compile_dkdv(*json.loads(sys.argv[1]))))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps([prog.encode(), head_dim, tma])],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("this Triton has no NVIDIA backend")
    return result


def compile_dkdv(program: str, head_dim: int, tma: bool) -> str | None:
    """(In the child.) Compile the dK/dV kernel as a launch on contiguous bf16 tensors would."""
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        return None
    prog = ScoreProgram.decode(program)
    fn = codegen.load(program)._attn_bwd_dkdv
    names = fn.arg_names
    # as a launch with contiguous tensors specializes it: unit head-dim strides
    consts = dict(GROUP=1, CAUSAL=1 if prog.causal else 0, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim,
                  BLOCK_M=64, BLOCK_N=64, PRECISION="tf32", TMA=tma, FLAT=False)
    consts.update({n: 1 for n in names if n.startswith("stride") and n.endswith("d")})
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("QDesc", "dODesc") and tma:
            sig[n] = f"tensordesc<bf16[1,1,64,{head_dim}]>"
        elif n in ("Stats", "Delta"):
            sig[n] = "*fp32"
        elif n in ("Q", "K", "V", "dOut", "dK", "dV", "QDesc", "dODesc"):
            sig[n] = "*bf16"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or n.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items() if n in names},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=2))
    return compiled.asm["ttgir"]


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


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_dkdv_key_loops_are_pipelined(tma):
    # the next Q and dO tiles are in flight while this one computes. A `while` loop or a
    # tl.debug_barrier() in the loop body can silently stop Triton from pipelining it
    prog = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    loops = [b for b in _loops(_dkdv_ttgir(prog, tma=tma)) if "warp_group_dot" in b]
    assert loops, "no key loop with Hopper matrix products"
    for body in loops:
        assert len(re.findall(r"warp_group_dot ", body)) == 4  # QKᵀ, dO·Vᵀ, dV, dK
        assert "async_tma_copy_global_to_local" in body or "async_copy_global_to_local" in body, body
