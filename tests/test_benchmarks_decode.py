"""The decode benchmark's smoke run on CPU (Triton interpreter): it runs, checks its results
against fp32 attention, and writes its table and JSON. Times here mean nothing."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import decode  # noqa: E402


def test_tiny_run_checks_results_and_writes_json(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CPU smoke run")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert decode.main(["--tiny"]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"flashfx", "flashfx unsplit", "flashfx head per tile"}
    assert all(r["err"] < 1e-4 for r in rows)
    assert any(r["parts"] == 2 for r in rows)  # the split path ran
    assert "| flashfx | 2 |" in capsys.readouterr().out
