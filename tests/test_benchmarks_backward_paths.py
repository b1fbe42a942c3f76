"""The backward-paths benchmark's smoke run on CPU (Triton interpreter): it runs the flashfx
backward paths and SDPA's backward, checks their gradients against fp32 attention, and writes
its table and JSON. The warp-specialized kernels need an sm_90 GPU, so every flashfx path is the
generated one here. Times mean nothing."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import backward_paths  # noqa: E402


def test_tiny_run_checks_gradients_and_writes_json(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CPU smoke run")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backward_paths.main(["--tiny", "--rounds", "2"]) == 0
    rows = json.loads((tmp_path / "backward_paths.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [s[0] for s in backward_paths.TINY]
    for r in rows:
        assert set(r["us"]) == {"generated", "ws-dkdv", "chosen", "cudnn"} and r["ws_taken"] == "none"
        assert max(r["errors"].values()) < 1e-4 and all(len(k) == 2 for k in r["kernels"].values())
    out = capsys.readouterr().out
    assert "| tiny causal | none | — | — | " in out
    assert (tmp_path / "backward_paths.png").exists() or backward_paths.plots.pyplot() is None


def test_a_wrong_gradient_fails_the_run(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CPU smoke run")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = backward_paths.calls

    def off(q, k, v, do, prog):  # the chosen path's dK doubled
        paths = real(q, k, v, do, prog)
        f, ws = paths["chosen"]
        paths["chosen"] = (lambda: (lambda g: (g[0], 2 * g[1], g[2]))(f()), ws)
        return paths

    monkeypatch.setattr(backward_paths, "calls", off)
    assert backward_paths.main(["--tiny", "--rounds", "1"]) == 1
