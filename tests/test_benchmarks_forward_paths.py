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
    causal = forward_paths.ScoreProgram((forward_paths.ScoreOp("scale", None, 0.125),), "top_left")
    monkeypatch.setattr(forward_paths, "_supports", lambda *args: "head dim 64 with 9.0 pairs of query tiles an SM")
    assert forward_paths._without_d64_rule(causal, torch.bfloat16, torch.device("cpu"), 64, 64, 64, 8) is None
    monkeypatch.setattr(forward_paths, "_supports", lambda *args: "not an sm_90 GPU")
    assert forward_paths._without_d64_rule(causal, torch.bfloat16, torch.device("cpu"), 64, 64, 64, 8) == "not an sm_90 GPU"
