"""The launch path of the generated kernels: what one call's signature fixes is made once."""

import pytest
import torch

from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.planner import hardware
from flashfx.runtime import gpu
from flashfx.runtime import tiles as tiling
from tests.reference import reference_attention

PROG = ScoreProgram((ScoreOp("scale", None, 0.3),), "top_left")


@pytest.fixture(autouse=True)
def _interpreted():
    if torch.cuda.is_available():
        pytest.skip("the interpreted launch path; the gpu tests cover CUDA")
    gpu._recipes.clear()
    yield
    gpu._recipes.clear()


def _qkvd(seed, n=37, transpose=False):
    g = torch.Generator().manual_seed(seed)
    if transpose:  # [B, N, H, D] storage seen as [B, H, N, D]
        return [torch.randn(1, n, 2, 16, generator=g).transpose(1, 2) for _ in range(4)]
    return [torch.randn(1, 2, n, 16, generator=g) for _ in range(4)]


def _planning_calls(monkeypatch) -> list:
    calls = []
    real = tiling.run_planned

    def counted(*a, **kw):
        calls.append(a[4:])
        return real(*a, **kw)

    monkeypatch.setattr(tiling, "run_planned", counted)
    return calls


def _check(q, k, v, do):
    out, stats = gpu.forward(q, k, v, [], PROG)
    dq, dk, dv = gpu.backward(do, q, k, v, out, stats, [], PROG)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, [], PROG)
    ref.backward(do.double())
    for got, want in ((out, ref), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_a_signature_plans_once_and_fresh_inputs_reuse_its_launches(monkeypatch):
    calls = _planning_calls(monkeypatch)
    _check(*_qkvd(0))
    assert len(calls) == 2  # forward and backward planned on the first call
    _check(*_qkvd(1))  # new tensors, same signature: nothing planned, results still right
    assert len(calls) == 2
    _check(*_qkvd(2, transpose=True))  # other strides: a new signature
    assert len(calls) == 4
    _check(*_qkvd(3, n=45))  # another length
    assert len(calls) == 6


def test_settings_that_steer_launches_are_part_of_the_signature(monkeypatch):
    calls = _planning_calls(monkeypatch)
    _check(*_qkvd(0))
    monkeypatch.setattr(gpu, "TMA", True)  # descriptor reads forced: new launchers
    _check(*_qkvd(1))
    monkeypatch.setattr(gpu, "FLAT_DKDV", True)
    _check(*_qkvd(2))
    with hardware.overridden("A10"):
        _check(*_qkvd(3))
    assert len(calls) == 8


def test_autotuned_programs_choose_per_call(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    tiling.clear_memory()
    calls = _planning_calls(monkeypatch)
    tuned = ScoreProgram(PROG.ops, PROG.causal, autotune=True)
    q, k, v, _ = _qkvd(0)
    for _ in range(2):
        gpu.forward(q, k, v, [], tuned)
    assert len(calls) == 2 and not gpu._recipes
    tiling.clear_memory()


def test_forced_key_range_parts_are_part_of_the_signature(monkeypatch):
    calls = _planning_calls(monkeypatch)
    _check(*_qkvd(0))
    monkeypatch.setattr(gpu, "FWD_SPLITS", 3)  # the forward in 3 parts plus a combine
    _check(*_qkvd(1))
    assert len(calls) == 3  # the forward planned again, the backward's launches reused
