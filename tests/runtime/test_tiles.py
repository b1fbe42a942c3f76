"""Per-call tile plans (shape buckets) and the opt-in autotuner with its on-disk cache."""

import json
import os

import pytest
import torch

import flashfx
from flashfx import config
from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.planner import hardware
from flashfx.planner.plan import KernelTiles
from flashfx.runtime import tiles as tiling

CUDA = torch.device("cuda")  # planning only: nothing is allocated on it


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # plan as for a real GPU, not the interpreter


def test_plan_follows_the_call_shape_in_power_of_two_buckets(compiled):
    causal = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    with hardware.overridden("H200"):
        a = tiling.for_shape((2, 16, 1000, 128), (2, 4, 1000, 128), torch.bfloat16, CUDA, causal)
        b = tiling.for_shape((2, 16, 1024, 128), (2, 4, 1024, 128), torch.bfloat16, CUDA, causal)
        c = tiling.for_shape((2, 16, 4096, 128), (2, 4, 4096, 128), torch.bfloat16, CUDA, ScoreProgram())
    assert a is b  # one bucket: the same (cached) plan
    assert "N=1024" in a.shape and "causal" in a.shape and "GQA 4" in a.shape and "B·H=32" in a.shape
    assert "N=4096" in c.shape and "causal" not in c.shape
    for p in (a, c):
        assert p.sram_used <= hardware.KNOWN["H200"].smem_per_block


def test_the_users_gpu_choice_wins_over_the_device(compiled):
    with hardware.overridden("RTX 4090"):
        p = tiling.for_shape((1, 8, 2048, 256), (1, 8, 2048, 256), torch.float16, CUDA, ScoreProgram())
    assert p.gpu == "RTX 4090" and p.sram_used <= hardware.KNOWN["RTX 4090"].smem_per_block


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 40, 16, generator=g).requires_grad_() for _ in range(3)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "cpu_kernel", "triton")
    tiling.clear_memory()
    yield tmp_path / "autotune.json"
    tiling.clear_memory()


def test_autotune_measures_once_then_reads_the_cache(cache, monkeypatch):
    program = ScoreProgram((ScoreOp("scale", None, 0.25),), "top_left", autotune=True).encode()
    q, k, v = _qkv()
    out = torch.ops.flashfx.attention(q, k, v, [], program)[0]
    out.backward(torch.randn_like(out))
    entries = json.loads(cache.read_text())
    kinds = sorted(key.split("|")[1] for key in entries)
    assert kinds == ["dkdv", "dq", "fwd"]
    assert all(tuple(t) in {(c.block_m, c.block_n, c.num_warps, c.num_stages, c.keys_down)
                            for c in tiling.INTERPRETER_CANDIDATES} for t in entries.values())

    # a fresh process (memory cleared) reads the file and measures nothing
    tiling.clear_memory()
    monkeypatch.setattr(tiling, "_seconds", lambda *a: pytest.fail("measured although cached"))
    q2, k2, v2 = _qkv(1)
    out2 = torch.ops.flashfx.attention(q2, k2, v2, [], program)[0]
    dout = torch.randn_like(out2)
    got = torch.autograd.grad(out2, (q2, k2, v2), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q2, k2, v2))
    s = (q64 @ k64.transpose(-2, -1)) * 0.25
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ v64
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out2.double(), ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4)


def test_a_candidate_that_fails_loses(cache, monkeypatch):
    q, k, v = _qkv()
    program = ScoreProgram((), None, autotune=True)
    base = tiling.for_call(q, k, program)
    good, bad = tiling.INTERPRETER_CANDIDATES

    def run(plan):
        if plan.fwd == bad:
            raise RuntimeError("out of resources")

    got = tiling.tuned(base, {"fwd": "key|fwd"}, run, lambda kernel: [bad, good], q.device)
    assert got.fwd == good
    assert json.loads(cache.read_text()) == {"key|fwd": [good.block_m, good.block_n, good.num_warps,
                                                         good.num_stages, False]}


def test_cached_dkdv_winner_keeps_its_orientation(cache):
    # a keys-down dK/dV winner is read back keys down; entries written before tiles had an
    # orientation (four fields) read as queries down
    q, k, v = _qkv()
    program = ScoreProgram((), None, autotune=True)
    base = tiling.for_call(q, k, program)
    down = KernelTiles(16, 32, 4, 1, 0, keys_down=True)
    got = tiling.tuned(base, {"dkdv": "key|dkdv"}, lambda plan: None, lambda kernel: [down], q.device)
    assert got.bwd_dkdv.keys_down
    tiling.clear_memory()
    again = tiling.tuned(base, {"dkdv": "key|dkdv"}, lambda plan: pytest.fail("measured again"),
                         lambda kernel: [], q.device)
    assert (again.bwd_dkdv.block_m, again.bwd_dkdv.block_n, again.bwd_dkdv.keys_down) == (16, 32, True)
    cache.write_text(json.dumps({"old|dkdv": [16, 16, 4, 1]}))
    tiling.clear_memory()
    old = tiling.tuned(base, {"dkdv": "old|dkdv"}, lambda plan: pytest.fail("measured again"),
                       lambda kernel: [], q.device)
    assert (old.bwd_dkdv.block_m, old.bwd_dkdv.keys_down) == (16, False)


def test_backend_option_marks_sites_for_tuning(cache):
    seen = []

    def inner(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v

    q, k, v = _qkv()
    torch._dynamo.reset()
    out = torch.compile(inner, backend="flashfx", options={"autotune": True, "inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, inner(q, k, v), atol=1e-5, rtol=1e-5)
    seen = [key.split("|")[1] for key in json.loads(cache.read_text())]
    assert seen == ["fwd"]
    with pytest.raises(Exception, match="option autotune=.yes.; expected True or False"):
        torch.compile(inner, backend="flashfx", options={"autotune": "yes"})(q, k, v)


def test_untuned_programs_encode_as_before():
    p = ScoreProgram((ScoreOp("scale", None, 0.5),), "top_left")
    assert "autotune" not in p.encode()
    assert ScoreProgram.decode(ScoreProgram(p.ops, p.causal, autotune=True).encode()).autotune
    assert os.path.basename(tiling.cache_path()) == "autotune.json"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_candidate_the_tuner_may_pick_computes_right(head_dim, causal, monkeypatch):
    """The planner's top candidates per kernel (what autotune measures, its first choice
    included) give the fp32 reference's output and gradients in bf16."""
    import dataclasses

    from flashfx.runtime import gpu

    # the generated kernels whose tiles these are, not the warp-specialized ones that take such
    # programs on sm_90
    monkeypatch.setattr(gpu, "WS_FORWARD", False)
    monkeypatch.setattr(gpu, "WS_BACKWARD", False)

    g = torch.Generator(device="cuda").manual_seed(head_dim)
    B, H, Hk, N = 2, 8, 2, 384
    q = torch.randn(B, H, N, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hk, N, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    program = ScoreProgram((ScoreOp("scale", None, head_dim ** -0.5),), "top_left" if causal else None)

    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q32, k32.repeat_interleave(H // Hk, 1), v32.repeat_interleave(H // Hk, 1), is_causal=causal,
        scale=head_dim ** -0.5)
    want = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q32, k32, v32), dout.float())))

    def err(a, b):
        return float((a.float() - b).norm() / b.norm())

    base = tiling.for_call(q, k, program)
    for kernel in ("fwd", "dkdv", "dq"):
        for cand in tiling.candidate_tiles(kernel, q, k, program):
            plan = dataclasses.replace(base, **{tiling.FIELD[kernel]: cand})
            out, stats = gpu.forward(q, k, v, [], program, plan)
            assert err(out, ref.detach()) < 1e-2, (kernel, cand)
            dq, dk, dv = gpu.backward(dout, q, k, v, out, stats, [], program, plan)
            for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
                assert err(got, want[name]) < 2e-2, (kernel, cand, name)


class OutOfResources(Exception):  # what Triton raises, by name
    pass


def test_a_shared_memory_overflow_plans_again_within_less(monkeypatch):
    q, k, _ = _qkv()
    program = ScoreProgram((ScoreOp("scale", None, 0.5), ScoreOp("bias", 0)))
    calls = []

    def run(plan):
        calls.append(tiling.margin(q.device, program, 16, q.dtype))
        if len(calls) == 1:
            raise OutOfResources("out of resource: shared memory, Required: 239616, Hardware limit: 232448. "
                                 "Reducing block sizes or `num_stages` may help.")
        return "ran"

    monkeypatch.setattr(tiling, "_margins", {})
    assert tiling.run_planned(run, q, k, program, [], ("fwd",)) == "ran"
    assert calls == [0, 239616 - 232448]
    # anything else is the caller's error, not retried
    with pytest.raises(RuntimeError, match="boom"):
        tiling.run_planned(lambda plan: (_ for _ in ()).throw(RuntimeError("boom")), q, k, program, [], ("fwd",))
    assert tiling._overflow(OutOfResources("out of resource: registers")) is None


def test_plans_are_remembered_per_call_and_remade_when_the_answer_can_change(monkeypatch):
    """for_shape runs on every op call: a repeated call is a dict hit, while another GPU
    choice or a new shared-memory margin plans again."""
    monkeypatch.setattr(tiling, "gpu_of", lambda device: hardware.chosen_by_user() or hardware.KNOWN["H200"])
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(tiling, "_plans", {})
    made = []
    real = tiling.plan
    monkeypatch.setattr(tiling, "plan", lambda *a, **kw: made.append(a[2].name) or real(*a, **kw))
    program = ScoreProgram((ScoreOp("scale", None, 0.125),), causal="top_left")
    shape, cuda = (2, 8, 1000, 128), torch.device("cuda", 0)
    first = tiling.for_shape(shape, shape, torch.bfloat16, cuda, program)
    assert tiling.for_shape(shape, shape, torch.bfloat16, cuda, program) is first and len(made) == 1
    with hardware.overridden("A10"):
        assert tiling.for_shape(shape, shape, torch.bfloat16, cuda, program).gpu != first.gpu
    monkeypatch.setattr(tiling, "_margins_version", tiling._margins_version + 1)
    tiling.for_shape(shape, shape, torch.bfloat16, cuda, program)
    assert made == ["H200", "A10", "H200"]
