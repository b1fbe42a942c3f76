"""The launch path of the generated kernels: what one call's signature fixes is made once."""

import dataclasses

import pytest
import torch

from flashfx.ir import ScoreOp, ScoreProgram
from flashfx.planner import hardware
from flashfx.runtime import gpu
from flashfx.runtime import tiles as tiling
from tests.reference import reference_attention

PROG = ScoreProgram((ScoreOp("scale", None, 0.3),), "top_left")


@pytest.fixture(autouse=True)
def _interpreted(request):
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
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


def _split_qkv(seed, n=29, heads=2, d=16):
    """q, k, v as a GPT-style model makes them: views of one [B, N, 3·H·D] projection, not
    dense, so the outputs (empty_like) get strides of their own."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, n, 3 * heads * d, generator=g)
    q, k, v = (t.view(2, n, heads, d).transpose(1, 2) for t in qkv.split(heads * d, dim=2))
    return q, k, v, torch.randn(2, heads, n, d, generator=g)


def test_strides_made_once_fit_later_calls_of_the_signature(monkeypatch):
    # a signature's integer arguments (strides of inputs and outputs) are made on its first
    # call; later calls pass fresh tensors with them
    calls = _planning_calls(monkeypatch)
    for seed in range(3):
        _check(*_split_qkv(seed))
    assert len(calls) == 2
    q, k, v, do = _split_qkv(3)
    out, stats = gpu.forward(q, k, v, [], PROG)
    assert not q.is_contiguous() and out.stride() == torch.empty_like(q, device="meta").stride()


def test_settings_that_steer_launches_are_part_of_the_signature(monkeypatch):
    calls = _planning_calls(monkeypatch)
    _check(*_qkvd(0))
    monkeypatch.setattr(gpu, "TMA", True)  # descriptor reads forced: new launchers
    _check(*_qkvd(1))
    monkeypatch.setattr(gpu, "FLAT_DKDV", True)
    _check(*_qkvd(2))
    with hardware.overridden("A10"):
        _check(*_qkvd(3))
    monkeypatch.setattr(gpu, "DIRECT_LAUNCH_RAW", False)  # kept binaries launched through `run`
    _check(*_qkvd(4))
    monkeypatch.setenv("FLASHFX_TMA", "0")  # read per call (config.getenv)
    _check(*_qkvd(5))
    monkeypatch.setattr(gpu, "HEADS_FIRST", True)  # the backward's program order
    _check(*_qkvd(6))
    assert len(calls) == 14


@pytest.mark.parametrize("causal, n_q, n_k, heads, kv_heads", [
    ("top_left", 37, 37, 3, 3), ("bottom_right", 21, 45, 4, 2), ("top_left", 45, 21, 2, 1), (None, 29, 29, 2, 2)])
def test_heads_first_backward_launches_transposed_grids_with_the_same_gradients(
        monkeypatch, causal, n_q, n_k, heads, kv_heads):
    # each gradient element is one program's sum: the order programs start in changes no bit
    grids = []
    real = gpu._launch

    def spy(kernel, grid, *a, **kw):
        if "HEADS_FIRST" in kw:
            grids.append((kernel.fn.__name__, grid, kw["HEADS_FIRST"]))
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(gpu, "_launch", spy)
    prog = ScoreProgram((ScoreOp("scale", None, 0.25),), causal)
    g = torch.Generator().manual_seed(n_q + n_k)
    q, do = (torch.randn(2, heads, n_q, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(2, kv_heads, n_k, 16, generator=g) for _ in range(2))
    out, stats = gpu.forward(q, k, v, [], prog)
    grads = {}
    for first in (False, True):
        monkeypatch.setattr(gpu, "HEADS_FIRST", first)
        grads[first] = gpu.backward(do, q, k, v, out, stats, [], prog)
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    reference_attention(q64, k64, v64, [], prog).backward(do.double())
    for got, want in zip(grads[True], (q64.grad, k64.grad, v64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    # (blocks, batch·heads) by default, (batch·heads, blocks) heads first
    by = {(name, first): grid for name, grid, first in grids}
    assert by[("_attn_bwd_dkdv", True)] == by[("_attn_bwd_dkdv", False)][::-1]
    assert by[("_attn_bwd_dq", True)] == by[("_attn_bwd_dq", False)][::-1]
    assert by[("_attn_bwd_dkdv", True)][0] == 2 * kv_heads and by[("_attn_bwd_dq", True)][0] == 2 * heads


def test_the_order_is_the_cost_models_choice_on_a_gpu(monkeypatch):
    from flashfx.planner import cost

    asked = []
    monkeypatch.setattr(cost, "heads_first", lambda kernel, shape, g: asked.append((kernel, shape)) or True)
    q = torch.empty(2, 12, 4096, 64, dtype=torch.bfloat16, device="meta")
    assert not gpu.heads_first("dkdv", q, q, PROG)  # not a CUDA tensor (meta; under the interpreter CPU)
    monkeypatch.setattr(gpu.tiling, "interpreting", lambda: False)
    monkeypatch.setattr(gpu.tiling, "gpu_of", lambda device: hardware.KNOWN["H200"])
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert gpu.heads_first("dq", q, q[:, :4], PROG)
    assert asked == [("dq", cost.Shape(4096, 4096, 64, 2, True, 3, 24))]
    monkeypatch.setattr(gpu, "HEADS_FIRST", False)
    assert not gpu.heads_first("dq", q, q, PROG)


@pytest.mark.parametrize("d, causal, group, flat", [
    (128, True, 1, True),    # causal MHA at 128: the nested loops spill (see gpu._flat_dkdv)
    (128, True, 2, False), (128, False, 1, False), (64, True, 1, False), (256, False, 2, True)])
def test_dkdv_group_loop_follows_head_dim_mask_and_group(monkeypatch, d, causal, group, flat):
    # the launch gets FLAT from the call itself: its head dim, mask and GQA group
    seen = []
    real = gpu._launch

    def spy(kernel, grid, *a, **kw):
        if "FLAT" in kw:
            seen.append(kw["FLAT"])
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(gpu, "_launch", spy)
    prog = ScoreProgram((ScoreOp("scale", None, 0.1),), "top_left" if causal else None)
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 2, 8, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2 // group, 8, d, generator=g) for _ in range(2))
    out, stats = gpu.forward(q, k, v, [], prog)
    gpu.backward(do, q, k, v, out, stats, [], prog)
    assert seen == [flat]


def test_dkdv_keys_down_keeps_nested_loops_at_128(monkeypatch):
    # keys down at d=128 (the plan's dK/dV for causal MHA there) the nested loops were faster
    # in every family measured, the flattened one stays for queries down and d=256
    seen = []
    real = gpu._launch

    def spy(kernel, grid, *a, **kw):
        if "FLAT" in kw:
            seen.append((kw["KEYS_DOWN"], kw["FLAT"]))
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(gpu, "_launch", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, 40, 128, generator=g) for _ in range(4))
    out, stats = gpu.forward(q, k, v, [], PROG)
    p = gpu.tile_plan(q, k, PROG)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference_attention(qd, kd, vd, [], PROG), (qd, kd, vd), do.double())
    for down in (False, True):
        t = dataclasses.replace(p.bwd_dkdv, block_m=16, block_n=32, keys_down=down)
        grads = gpu.backward(do, q, k, v, out, stats, [], PROG, tiles=dataclasses.replace(p, bwd_dkdv=t))
        for got, ref in zip(grads, want):
            torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=2e-4)
    assert seen == [(False, True), (True, False)]
    assert gpu._flat_dkdv(256, True, 1, keys_down=True) and not gpu._flat_dkdv(128, False, 1, keys_down=False)


def test_the_backward_tunes_only_the_generated_kernels_that_run(monkeypatch):
    # where a warp-specialized kernel takes a call, timing its generated counterpart's tile
    # candidates would time the Gluon kernel each time: the tuner gets the others alone
    calls = _planning_calls(monkeypatch)
    q, k, v, do = _qkvd(0)
    out, stats = gpu.forward(q, k, v, [], PROG)
    gpu.backward(do, q, k, v, out, stats, [], PROG)
    assert calls[-1][1] == ("dkdv", "dq")  # the interpreter: no Gluon kernel
    # as if the Gluon kernels took the signature and fell back per call (no launch is made)
    monkeypatch.setattr(gpu, "_ws_dkdv_launch", lambda *args: (None, ()))
    monkeypatch.setattr(gpu, "_ws_dq_launch", lambda *args: (None, ()))
    for n, takes, tuned in ((41, (True, False), ("dq",)), (42, (False, True), ("dkdv",)), (43, (True, True), ())):
        monkeypatch.setattr(gpu, "_ws_dkdv_takes", lambda *args, t=takes[0]: t)
        monkeypatch.setattr(gpu, "_ws_dq_takes", lambda *args, t=takes[1]: t)
        q, k, v, do = _qkvd(1, n=n)
        out, stats = gpu.forward(q, k, v, [], PROG)
        gpu.backward(do, q, k, v, out, stats, [], PROG)
        assert calls[-1][1] == tuned


def test_the_forward_tunes_its_tiles_only_where_the_generated_forward_runs(monkeypatch):
    # where the warp-specialized forward takes the signature (no split key range at the
    # planner's tiles), every candidate would time it; a split forward is the generated one
    calls = _planning_calls(monkeypatch)
    gpu.forward(*_qkvd(0)[:3], [], PROG)
    assert calls[-1][1] == ("fwd",)  # the interpreter: no Gluon kernel
    monkeypatch.setattr(gpu, "_ws_fwd_takes", lambda *args: True)
    monkeypatch.setattr(gpu, "_ws_launch", lambda *args: (None, ()))  # as if it fell back per call
    for n, splits, tuned in ((41, None, ()), (42, 2, ("fwd",))):
        monkeypatch.setattr(gpu, "FWD_SPLITS", splits)
        q, k, v, _ = _qkvd(1, n=n)
        out, _ = gpu.forward(q, k, v, [], PROG)
        assert calls[-1][1] == tuned
        ref = reference_attention(*(x.double() for x in (q, k, v)), [], PROG)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_autotuned_programs_tune_once_then_reuse_the_launches(monkeypatch, tmp_path):
    # the first call tunes (measuring each candidate); later calls of the signature launch the
    # winner as kept, with no planning or cache lookup on the way
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path))
    tiling.clear_memory()
    calls = _planning_calls(monkeypatch)
    measured = []
    real = tiling._seconds
    monkeypatch.setattr(tiling, "_seconds", lambda run, device: measured.append(1) or real(run, device))
    tuned = ScoreProgram(PROG.ops, PROG.causal, autotune=True)
    q, k, v, _ = _qkvd(0)
    first = gpu.forward(q, k, v, [], tuned)[0]
    assert len(calls) == 1 and len(measured) == len(tiling.INTERPRETER_CANDIDATES) and len(gpu._recipes) == 1
    for seed in (1, 2):
        q, k, v, _ = _qkvd(seed)
        out = gpu.forward(q, k, v, [], tuned)[0]
        ref = reference_attention(*(x.double() for x in (q, k, v)), [], PROG)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert len(calls) == 1 and len(measured) == len(tiling.INTERPRETER_CANDIDATES)
    assert first.shape == out.shape
    tiling.clear_memory()


@pytest.fixture
def _fp32_settings():
    """Restores torch's fp32 matmul precision settings (new API) after a test changes them."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def _set(obj, attr: str, value):
    return lambda: setattr(obj, attr, value)


@pytest.mark.parametrize("setting, want", [
    (lambda: None, "tf32x3"),  # torch's default: IEEE fp32 matmuls
    (_set(torch.backends.cuda.matmul, "allow_tf32", True), "tf32"),  # the legacy flag
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (_set(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),  # the new API, which makes
    (_set(torch.backends, "fp32_precision", "tf32"), "tf32"),               # reading allow_tf32 raise
    (_set(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "tf32x3"),
], ids=["default", "allow_tf32", "set_float32_matmul_precision", "matmul.fp32_precision",
        "backends.fp32_precision", "ieee"])
def test_fp32_products_follow_the_users_tf32_setting(_fp32_settings, setting, want):
    torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "none"
    setting()
    q = torch.randn(1, 1, 4, 16)
    assert gpu._precision(q) == want
    assert gpu._precision(q.half()) == gpu._precision(q.bfloat16()) == "tf32"  # ignored there


def test_forced_key_range_parts_are_part_of_the_signature(monkeypatch):
    calls = _planning_calls(monkeypatch)
    _check(*_qkvd(0))
    monkeypatch.setattr(gpu, "FWD_SPLITS", 3)  # the forward in 3 parts plus a combine
    _check(*_qkvd(1))
    assert len(calls) == 3  # the forward planned again, the backward's launches reused


# ---- direct launches (gpu._Kernel) ------------------------------------------------------------


class _FakeBinary:
    """What Triton's launch returns: a compiled kernel whose launcher records its arguments."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *args):
        self.runs.append(((gx, gy, gz), stream, args))


class _FakeJit:
    arg_names = ["X", "Y", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.launches, self.binary = [], _FakeBinary()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.binary
        return launch


class _FakeDriver:
    device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 1000 + device


def test_direct_launch_keeps_the_binary_and_falls_back_when_specialization_would_differ(monkeypatch):
    from triton.runtime import driver

    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    fake = _FakeDriver()
    monkeypatch.setattr(driver, "_active", fake)
    jit = _FakeJit()
    kernel = gpu._Kernel(jit, (3, 2), {"BLOCK": 64, "FLAG": True, "num_warps": 4})
    x = torch.randn(64)
    y = torch.randn(64)
    kernel(x, y, 7)  # the first call goes through Triton's launch and keeps its binary
    assert jit.launches == [((3, 2, 1), (x, y, 7), {"BLOCK": 64, "FLAG": True, "num_warps": 4})]
    x2 = torch.randn(64)
    kernel(x2, y, 7)  # the binary's launcher, with the compile-time arguments in signature order
    assert len(jit.launches) == 1
    assert jit.binary.runs == [((3, 2, 1), 1000, (x2, y, 7, 64, True))]
    unaligned = torch.randn(65)[1:]  # 4 bytes past an aligned start: Triton would specialize anew
    kernel(unaligned, y, 7)
    assert len(jit.launches) == 2 and len(jit.binary.runs) == 1
    fake.device = 1  # another current device: its own binary, through Triton
    kernel(x, y, 7)
    assert len(jit.launches) == 3 and len(jit.binary.runs) == 1
    fake.device = 0
    monkeypatch.setattr(gpu, "DIRECT_LAUNCH", False)  # switched off: nothing kept
    off = gpu._Kernel(jit, (3,), {"BLOCK": 64, "FLAG": True})
    off(x, y, 7)
    off(x, y, 7)
    assert len(jit.launches) == 5 and len(jit.binary.runs) == 1


def test_a_binary_specialized_for_an_unaligned_pointer_is_not_kept(monkeypatch):
    from triton.runtime import driver

    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(driver, "_active", _FakeDriver())
    jit = _FakeJit()
    kernel = gpu._Kernel(jit, (1,), {"BLOCK": 64, "FLAG": True})
    unaligned, y = torch.randn(65)[1:], torch.randn(64)
    kernel(unaligned, y, 7)
    kernel(y, y, 7)
    assert len(jit.launches) == 2 and not jit.binary.runs


def _triton36_launcher(calls: list, indices: set, metas: list):
    """A stand-in for Triton 3.6's CUDA launcher: `launch` wraps the compiled launcher in a
    closure that would expand tensor descriptors (here it must not be reached)."""
    def compiled(*args):
        calls.append(args)

    def wrap(launcher, tensordesc_indices, tensordesc_meta):
        def inner(*args):
            raise AssertionError((launcher, tensordesc_indices, tensordesc_meta))
        return inner

    class CudaLauncher:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True

        def __init__(self):
            self.launch = wrap(compiled, indices, metas)

        def __call__(self, gridX, gridY, gridZ, stream, function, *args):
            raise AssertionError("kept encodings go to the compiled launcher")

    return CudaLauncher()


def test_descriptor_reads_are_encoded_once_per_address(monkeypatch):
    from triton.backends.nvidia import driver as nv
    from triton.runtime import driver

    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(driver, "_active", _FakeDriver())
    encodes = []

    def make_tensordesc_arg(arg, metadata):
        encodes.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), metadata), *arg.shape, *arg.strides]

    monkeypatch.setattr(nv, "make_tensordesc_arg", make_tensordesc_arg)
    monkeypatch.setattr(nv, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOO", raising=False)
    jit = _FakeJit()
    jit.arg_names = ["X", "YDesc", "n", "BLOCK", "FLAG"]
    calls = []
    jit.binary.run = _triton36_launcher(calls, {1}, ["meta"])
    geometry = ([1, 1, 64, 16], [1024, 1024, 16, 1], [1, 1, 16, 16])
    kernel = gpu._Kernel(jit, (3, 2), {"BLOCK": 64, "FLAG": True}, descs=((1, *geometry),))
    x = torch.randn(64)
    y, y2 = (torch.randn(1, 1, 64, 16) for _ in range(2))
    kernel(x, y, 7)  # through Triton's launch, which gets a descriptor of y
    (_, args, _), = jit.launches
    assert args[0] is x and args[1].base is y and [args[1].shape, args[1].strides, args[1].block_shape] == list(geometry)
    assert kernel.raw is not None and not encodes
    for t in (y, y, y2, y):
        kernel(x, t, 7)
    assert encodes == [y.data_ptr(), y2.data_ptr()]  # each address encoded once
    assert len(calls) == 4 and len(jit.launches) == 1
    base = ((3, 2, 1), 1000, "function", False, True, None, None, "metadata", None, None)
    for t, got in zip((y, y, y2, y), calls):
        assert got[:3] == base[0] and got[3:13] == base[1:] + (None,)  # no launch hooks set
        assert got[13] is x and got[14] == ("map", t.data_ptr(), "meta")
        assert list(got[15:23]) == geometry[0] + geometry[1] and got[23:] == (7, 64, True)
    # a launcher of another layout: descriptors go to Triton's launcher on every call
    other = _FakeJit()
    other.arg_names = jit.arg_names
    kernel = gpu._Kernel(other, (1,), {"BLOCK": 64, "FLAG": True}, descs=((1, *geometry),))
    kernel(x, y, 7)
    kernel(x, y, 7)
    assert kernel.raw is None and len(other.binary.runs) == 1 and other.binary.runs[0][2][1].base is y


def test_a_models_layers_keep_their_encoded_descriptors_from_step_to_step(monkeypatch):
    """One launcher serves all layers of a model at one shape; each layer's tensors keep their
    addresses across steps, so after the first step no descriptor is encoded again."""
    from triton.backends.nvidia import driver as nv
    from triton.runtime import driver

    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(driver, "_active", _FakeDriver())
    encodes = []
    def make_tensordesc_arg(arg, metadata):
        encodes.append(arg.base.data_ptr())
        return [0]

    monkeypatch.setattr(nv, "make_tensordesc_arg", make_tensordesc_arg)
    monkeypatch.setattr(nv, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOO", raising=False)
    jit = _FakeJit()
    names = [f"T{i}Desc" for i in range(6)]
    jit.arg_names = names + ["BLOCK", "FLAG"]
    jit.binary.run = _triton36_launcher([], set(range(6)), ["meta"] * 6)
    geometry = ([1, 1, 64, 16], [1024, 1024, 16, 1], [1, 1, 16, 16])
    kernel = gpu._Kernel(jit, (1,), {"BLOCK": 64, "FLAG": True}, descs=tuple((i, *geometry) for i in range(6)))
    layers = [[torch.randn(1, 1, 64, 16) for _ in range(6)] for _ in range(24)]  # 144 descriptors
    counts = []
    for _ in range(3):
        for tensors in layers:
            kernel(*tensors)
        counts.append(len(encodes))
    # the very first call goes through Triton's launch; the first layer's next call encodes its
    # six; after that nothing is encoded again
    assert counts == [23 * 6, 24 * 6, 24 * 6], counts


def test_pointer_reads_go_to_the_compiled_launcher_unless_a_launch_hook_is_set(monkeypatch):
    from triton import knobs
    from triton.backends.nvidia import driver as nv
    from triton.runtime import driver

    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(driver, "_active", _FakeDriver())
    monkeypatch.setattr(nv, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOO", raising=False)
    jit = _FakeJit()
    calls = []
    run = _triton36_launcher(calls, set(), [])

    class Compiled:  # no descriptors: `launch` is the compiled launcher itself
        def __call__(self, *args):
            calls.append(args)

    run.launch = Compiled()
    jit.binary.run = run
    kernel = gpu._Kernel(jit, (3,), {"BLOCK": 64, "FLAG": True})
    x, y = torch.randn(64), torch.randn(64)
    kernel(x, y, 7)
    kernel(x, y, 7)
    assert len(jit.launches) == 1 and len(calls) == 1
    assert calls[0][:13] == (3, 1, 1, 1000, "function", False, True, None, None, "metadata", None, None, None)
    assert calls[0][13:] == (x, y, 7, 64, True)
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:  # a hook wants its launch metadata: Triton's own path
        with pytest.raises(AssertionError, match="compiled launcher"):
            kernel(x, y, 7)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)


@pytest.mark.gpu
def test_direct_launches_on_the_gpu_match_the_reference_and_respect_alignment():
    """Repeated calls of one signature launch kept binaries; an unaligned view of the same
    shape and strides goes back through Triton and is still right."""
    def check(q, k, v, do, prog):
        out, stats = gpu.forward(q, k, v, [], prog)
        dq, dk, dv = gpu.backward(do, q, k, v, out, stats, [], prog)
        q64, k64, v64 = (x.cpu().double().requires_grad_() for x in (q, k, v))
        ref = reference_attention(q64, k64, v64, [], prog)
        ref.backward(do.cpu().double())
        for got, want in ((out, ref), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
            assert ((got.double().cpu() - want).norm() / want.norm()).item() < 2e-2

    prog = ScoreProgram((ScoreOp("scale", None, 0.125),), "top_left")
    shape = (2, 4, 200, 64)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        check(*(torch.randn(shape, device="cuda", dtype=torch.float16, generator=g) for _ in range(4)), prog)
    kept = [launch for call in gpu._recipes.values() for launch in call.launches]  # those aligned calls make
    assert kept and all((launch.tma or launch.ptr).binary is not None for launch in kept)
    import triton

    if triton.__version__.startswith("3.6."):  # the launcher layout gpu._raw_launcher knows
        assert all((launch.tma or launch.ptr).raw is not None for launch in kept)
    n = 2 * 4 * 200 * 64
    g = torch.Generator(device="cuda").manual_seed(7)
    flat = torch.randn(4 * n + 1, device="cuda", dtype=torch.float16, generator=g)
    # the same shapes and strides, 2 bytes past an aligned start: Triton specializes them anew
    check(*(flat[1 + i * n:1 + (i + 1) * n].view(shape) for i in range(4)), prog)
