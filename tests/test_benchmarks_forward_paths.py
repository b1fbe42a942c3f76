"""The forward-paths benchmark's smoke run on CPU (Triton interpreter): it runs both flashfx
paths and SDPA, checks them against fp32 attention, and writes its table and JSON. The
warp-specialized kernel needs an sm_90 GPU, so its column stays empty here. Times mean nothing."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import forward_paths  # noqa: E402


def test_tiny_run_checks_results_and_writes_json(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CPU smoke run")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert forward_paths.main(["--tiny", "--rounds", "2"]) == 0
    rows = json.loads((tmp_path / "forward_paths.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [s[0] for s in forward_paths.TINY]
    for r in rows:
        assert set(r["tflops"]) == {"generated", "chosen", "cudnn"} and not r["ws_taken"]
        assert max(r["errors"].values()) < 1e-4 and all(len(t) == 2 for t in r["ms_rounds"].values())
    out = capsys.readouterr().out
    assert "| tiny causal | — | no |" in out and "| — |" in out  # the empty warp-specialized column


def test_the_d64_rule_is_lifted_only_for_the_ws_column(monkeypatch):
    from flashfx.codegen import hopper

    causal = forward_paths.ScoreProgram((forward_paths.ScoreOp("scale", None, 0.125),), "top_left")
    plain = forward_paths.ScoreProgram((forward_paths.ScoreOp("scale", None, 0.125),))
    sm90 = torch.device("cuda")  # as on an H200: sm_90, 132 SMs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    props = type("Props", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert hopper.supports(plain, torch.bfloat16, sm90, 64, 4096, 4096, 24).startswith("head dim 64 without a causal mask")
    monkeypatch.setattr(hopper, "d64_rule", forward_paths._no_rule)  # what calls() does for the "ws" column
    assert hopper.supports(plain, torch.bfloat16, sm90, 64, 4096, 4096, 24) is None
    assert hopper.supports(causal, torch.float32, sm90, 64, 4096, 4096, 24) == "inputs are not fp16/bf16"
