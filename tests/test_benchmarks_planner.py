"""The planner benchmarks on CPU: the sweep's dry run and its interpreted path (a compile worker
included), the launch recorder, and the ncu driver's parsing. Times here mean nothing."""

import json
import os
import sys

import pytest
import torch

# benchmarks/ is a folder of scripts, not a package of flashfx: import it from the source tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import planner_ncu, planner_sweep  # noqa: E402


def test_sweep_dry_run_lists_24_shapes_and_12_families(capsys):
    assert planner_sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "24 shapes, 12 kernel families" in out
    for fam in ("d64-full-mha", "d128-causal-gqa4", "d256-full-gqa4"):
        assert f"| {fam} |" in out
    assert "compile jobs" in out


def test_sweep_filters():
    shapes = planner_sweep.all_shapes()
    assert len(shapes) == 24 and all(s.B * s.N == 16384 for s in shapes)
    assert len(planner_sweep.select(shapes, None, "d128")) == 8
    assert len(planner_sweep.select(shapes, None, "causal-gqa4")) == 6
    assert [s.label for s in planner_sweep.select(shapes, "64:1024:causal:gqa", None)] == ["D=64 N=1024 causal GQA4"]
    long = planner_sweep.select(planner_sweep.all_shapes(ns=(16384,)), "64:16384:mha,128:16384:mha", None)
    assert sorted(s.label for s in long) == ["D=128 N=16384 causal MHA", "D=128 N=16384 full MHA",
                                             "D=64 N=16384 causal MHA", "D=64 N=16384 full MHA"]
    assert all(s.B == 1 for s in long)
    # 3 x 3 blocks x 2 warps x 3 stages, less 8-warp tiles with a dot under 128 rows, and
    # for dK/dV less 32-row Q tiles under wider key blocks (wrong results, plan._sound); dK/dV
    # adds its keys-down tiles, whose dots all have the BN rows: BN 64 with 4 warps, 128 with
    # 4 or 8, BM 16..128, 2 or 3 stages
    assert len(planner_sweep.grid("fwd", "full")) == len(planner_sweep.grid("dq", "full")) == 36
    dkdv = planner_sweep.grid("dkdv", "full")
    down = [c for c in dkdv if planner_sweep._down(c)]
    assert len(dkdv) - len(down) == 24 and len(down) == 24
    assert all(c[2] == 4 or min(c[:2]) == 128 for c in dkdv if not planner_sweep._down(c))
    assert not any(c[0] == 32 and c[1] > 32 for c in dkdv if not planner_sweep._down(c))
    assert all(c[1] >= 16 * c[2] for c in down) and {c[0] for c in down} == {16, 32, 64, 128}
    assert len(planner_sweep.grid("dkdv", "small")) == 10


def test_recorded_launch_replays_the_runtime(monkeypatch):
    """What the sweep times is the launch gpu.forward makes: replayed, it writes the same output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from flashfx.planner import hardware
    from flashfx.runtime import gpu

    shape = planner_sweep.Shape(16, 32, 1, 2, 1, True)
    base, _ = planner_sweep.planner_plan(shape, hardware.INTERPRETER, 2, interpret=True)
    case = planner_sweep.Case(shape, base, "cpu", torch.float16)
    launch, prep = case.launch("fwd", (32, 16, 4, 2))
    assert prep == [] and launch.kwargs["BLOCK_M"] == 32 and launch.kwargs["GROUP"] == 2
    out = launch.args[3]  # _attn_fwd(Q, K, V, Out, ...)
    out.zero_()
    launch()
    tiles = planner_sweep.with_tiles(base, "fwd", (32, 16, 4, 2))
    ref, _ = gpu.forward(case.q, case.k, case.v, [], case.program, tiles=tiles)
    torch.testing.assert_close(out, ref)
    launch, prep = case.launch("dq", (16, 16, 4, 1))  # dQ writes the row term itself
    assert prep == [] and launch.fn is case.module._attn_bwd_dq
    launch, prep = case.launch("dkdv", (16, 16, 4, 1))  # dK/dV reads the row term dQ writes first
    assert [p.fn for p in prep] == [case.module._attn_bwd_dq] and launch.fn is case.module._attn_bwd_dkdv


def test_recorder_stands_in_where_tiles_are_read_through_descriptors(monkeypatch):
    """On a GPU with tensor descriptors the runtime reads the kernel's `arg_names` to place them
    (gpu._launch): the recorder answers for its kernel, and records the launch with K and V as
    descriptors. (Before, every GPU compile job of the sweep failed there.)"""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from flashfx.planner import hardware
    from flashfx.runtime import gpu

    monkeypatch.setattr(gpu, "_tma_allowed", lambda device: True)
    shape = planner_sweep.Shape(16, 32, 1, 2, 2, False)
    base, _ = planner_sweep.planner_plan(shape, hardware.INTERPRETER, 2, interpret=True)
    case = planner_sweep.Case(shape, base, "cpu", torch.float16, run_forward=False)
    launch, _ = case.launch("fwd", (32, 16, 4, 2))
    assert launch.kwargs["TMA"] is True and launch.fn is case.module._attn_fwd
    assert [type(a) for a in launch.args[5:7]] == [TensorDescriptor, TensorDescriptor]  # KDesc, VDesc
    launch, prep = case.launch("dkdv", (16, 16, 4, 1))
    assert launch.kwargs["TMA"] is True and [p.fn for p in prep] == [case.module._attn_bwd_dq]


def test_sweep_tiny_interpreted_with_a_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert planner_sweep.main(["--tiny", "--jobs", "1", "--families", "causal-gqa2", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "planner_sweep.json").read_text())
    assert result["complete"] and result["compile"]["workers"] == 1 and result["compile"]["failed"] == 0
    (row,) = result["rows"]
    assert row["label"] == "D=16 N=32 causal GQA2"
    for kernel in ("fwd", "dkdv", "dq"):
        k = row["kernels"][kernel]
        assert k["timed"] == 2 and k["planner"] == [16, 16, 4, 1] and k["best_us"] <= k["planner_us"]
        # every timed config was checked against the fp32 reference
        assert all(0 < c["err"] < planner_sweep.MAX_ERROR for c in row["units"][kernel]["configs"])
    assert 0 < row["fwd_ratio"] <= 1 and 0 < row["bwd_ratio"] <= 1
    md = (tmp_path / "planner_sweep.md").read_text()
    assert "| D=16 N=32 causal GQA2 |" in md and "Acceptance" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "planner_sweep.png").stat().st_size > 0


def test_replan_scores_a_recorded_sweep_with_the_current_planner(tmp_path):
    # docs/planner_sweep.json replayed: the measured times stay, the choices and predictions are
    # the current planner's (here the same planner that chose them), and the summary follows
    recorded = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "planner_sweep.json")
    assert planner_sweep.main(["--replan", recorded, "--out-dir", str(tmp_path)]) == 0
    before, after = (json.loads(open(p).read()) for p in (recorded, tmp_path / "planner_sweep.json"))
    assert [r["label"] for r in after["rows"]] == [r["label"] for r in before["rows"]]
    for old, new in zip(before["rows"], after["rows"]):
        for kernel in ("fwd", "dkdv", "dq"):
            assert new["units"][kernel]["planner"] == old["units"][kernel]["planner"]
            assert [c.get("us") for c in new["units"][kernel]["configs"]] == [c.get("us") for c in old["units"][kernel]["configs"]]
    assert after["summary"]["bwd"] == before["summary"]["bwd"]
    assert "redone by" in (tmp_path / "planner_sweep.md").read_text()


def test_replan_leaves_choices_the_sweep_never_timed_out_of_the_ratios(tmp_path):
    # docs/planner_sweep_long.json timed queries-down dK/dV only; the planner now picks keys down
    # at d=128 causal and d=64 MHA: those shapes' backward has no ratio (not a 0), and the
    # summary says why
    recorded = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                            "planner_sweep_long.json")
    assert planner_sweep.main(["--replan", recorded, "--out-dir", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "planner_sweep.json").read_text())
    assert after["summary"]["untimed"] == ["D=64 N=16384 full MHA dkdv", "D=64 N=16384 causal MHA dkdv",
                                           "D=128 N=16384 causal MHA dkdv"]
    assert after["summary"]["bwd"]["n"] == 3 and after["summary"]["bwd"]["min"] > 0.9
    row = next(r for r in after["rows"] if r["label"] == "D=128 N=16384 causal MHA")
    assert "bwd_ratio" not in row and row["untimed"] == ["dkdv"] and "fwd_ratio" in row
    assert "left out of the ratios" in (tmp_path / "planner_sweep.md").read_text()


def test_ncu_dry_run_and_missing_ncu(capsys):
    assert planner_ncu.main(["--dry-run", "--shapes", "128:4096"]) == 0
    out = capsys.readouterr().out
    assert "D=128 N=4096 full MHA" in out and "--launch-skip 1 --launch-count 1" in out
    assert planner_ncu.main(["--ncu", "/nonexistent/ncu", "--shapes", "64:1024"]) == 2
    assert "not found" in capsys.readouterr().out


NCU_OUTPUT = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
PLANNER_NCU {"tiles": [128, 64, 8, 3], "predicted_bytes": 270532608.0, "gpu": "NVIDIA H200"}
==PROF== Profiling "_attn_fwd" - 0: 0%....50%....100% - 1 pass
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","_attn_fwd","1","7","(256, 1, 1)","(32, 64, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","203,423,744"
"0","4242","python3.12","127.0.0.1","_attn_fwd","1","7","(256, 1, 1)","(32, 64, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","68.16"
"""


def test_ncu_csv_and_child_line_parse():
    got = planner_ncu.parse_csv(NCU_OUTPUT)
    assert got == {"dram__bytes_read.sum": 203423744.0, "dram__bytes_write.sum": pytest.approx(68.16e6)}
    assert planner_ncu.child_info(NCU_OUTPUT)["tiles"] == [128, 64, 8, 3]
    assert planner_ncu.parse_csv("==ERROR== ERR_NVGPUCTRPERM") == {}
    s = planner_ncu.parse_spec("128:4096:causal:4")
    assert (s.B, s.H, s.Hk, s.causal) == (4, 16, 4, True) and planner_ncu.spec(s) == "128:4096:causal:4"
    # q, k, v read, out written (bf16), two fp32 row statistics written
    assert planner_ncu.compulsory_bytes(s) == 2 * 4 * 4096 * 128 * (2 * 16 + 2 * 4) + 8 * 4 * 16 * 4096


def _fake_ncu(tmp_path, text: str) -> str:
    """An `ncu` that prints canned output instead of profiling: the driver's plumbing, no GPU."""
    (tmp_path / "out.txt").write_text(text)
    path = tmp_path / "ncu"
    path.write_text(f"#!/bin/sh\ncat '{tmp_path / 'out.txt'}'\n")
    path.chmod(0o755)
    return str(path)


def test_ncu_driver_reports_and_explains_permission_errors(tmp_path, capsys):
    ncu = _fake_ncu(tmp_path, NCU_OUTPUT)
    assert planner_ncu.main(["--ncu", ncu, "--shapes", "128:4096:full:mha", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "planner_ncu.json").read_text())
    (row,) = result["rows"]
    assert row["measured_bytes"] == pytest.approx(203423744 + 68.16e6)
    assert row["ratio"] == pytest.approx(row["measured_bytes"] / 270532608) and row["within"]
    assert result["env"]["gpu"] == "NVIDIA H200" and result["within"] == 1
    assert "FAIL** — 1 of 1 shapes" in (tmp_path / "planner_ncu.md").read_text()

    ncu = _fake_ncu(tmp_path, "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n")
    assert planner_ncu.main(["--ncu", ncu, "--shapes", "64:1024:full", "--out-dir", str(tmp_path / "x")]) == 3
    assert "NVreg_RestrictProfilingToAdminUsers=0" in capsys.readouterr().out


def test_failing_configs_are_counted_not_fatal(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from flashfx.planner import hardware

    fam = planner_sweep.Family(16, False, 2, 2)
    bad = (16, 8, 4, 1)  # BLOCK_N < 16 trips the kernels' static assert
    report = planner_sweep.compile_job(fam, "fwd", bad, 32, "float16", True)
    assert report["status"] == "error" and report["error"]

    shape = planner_sweep.Shape(16, 32, 1, 2, 2, False)
    base, _ = planner_sweep.planner_plan(shape, hardware.INTERPRETER, 2, interpret=True)
    case = planner_sweep.Case(shape, base, "cpu", torch.float16)
    timer = planner_sweep.Timer("cpu", reps=2, warmup=0, cut=0)
    known_bad = (32, 8, 4, 1)
    unit = planner_sweep.time_unit(case, "fwd", [(16, 16, 4, 1), bad, known_bad],
                                   {known_bad: {"status": "out_of_resources", "error": "shared memory"}},
                                   timer, hardware.INTERPRETER, 2)
    result = planner_sweep.kernel_result(unit, base, "fwd")
    assert result["timed"] == 1 and result["failed"] == 2 and result["best"] == [16, 16, 4, 1]
    status = {tuple(r["cfg"]): r["status"] for r in unit["configs"]}
    assert status == {(16, 16, 4, 1): "ok", bad: "error", known_bad: "out_of_resources"}


def test_the_warp_specialized_fit_reproduces_the_constants_in_the_cost_model(capsys, tmp_path):
    from benchmarks import planner_ws_fit
    from flashfx.planner import cost

    assert planner_ws_fit.main(["--doc", str(tmp_path / "ws.md")]) == 0
    out = capsys.readouterr().out
    for (kernel, d), cal in cost.WS_CALIBRATION.items():  # cost.py holds what the fit finds
        assert f"({kernel!r}, {d}): WsCalibration(step_cycles={cal.step_cycles}, unit_cycles={cal.unit_cycles})" in out
    assert "39 points" in out and "faster kernel agrees at" in out
    assert (tmp_path / "ws.md").read_text().startswith("## The warp-specialized kernels in the cost model")
