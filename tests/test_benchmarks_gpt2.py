"""The GPT-2 training benchmark on a tiny config, on CPU: both attention switches agree, flashfx
fuses every layer's attention, and the benchmark's step and report run end to end."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch

import flashfx
from flashfx.passes.pipeline import counters

# benchmarks/ is a folder of scripts, not a package of flashfx: import it from the source tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gpt2_train  # noqa: E402
from benchmarks.gpt2 import GPT, GPTConfig  # noqa: E402

TINY = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=64)


def _model(attn: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY.__dict__, "attn": attn}))


def _batch(batch=2, seq=32):
    return gpt2_train.make_batch(batch, seq, TINY.vocab_size, "cpu", seed=0)


def test_switches_build_the_same_model_and_loss():
    naive, sdpa = _model("naive"), _model("sdpa")
    for (name, a), (_, b) in zip(naive.state_dict().items(), sdpa.state_dict().items()):
        assert torch.equal(a, b), name
    x, y = _batch()
    _, loss_naive = naive(x, y)
    _, loss_sdpa = sdpa(x, y)
    torch.testing.assert_close(loss_naive, loss_sdpa, rtol=1e-5, atol=1e-6)
    loss_naive.backward()
    loss_sdpa.backward()
    for (name, a), (_, b) in zip(naive.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tied_embeddings_and_unknown_switch():
    model = _model("naive")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="attn"):
        GPT(GPTConfig(**{**TINY.__dict__, "attn": "flash"}))


def test_flashfx_fuses_every_layer_and_matches_eager():
    model = _model("naive")
    x, y = _batch()
    report = flashfx.explain(model, x, y)
    assert report.fused == len(report.sites) == TINY.n_layer, str(report)

    _, ref = model(x, y)
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    before = counters["rewritten"]
    compiled = torch.compile(model, backend="flashfx", options={"inner": "aot_eager"})
    _, loss = compiled(x, y)
    assert counters["rewritten"] - before == TINY.n_layer, "flashfx did not rewrite every layer's attention"
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_benchmark_step_and_report(tmp_path):
    """One eager training step through the benchmark's own harness, then its table, markdown and plot."""
    args = SimpleNamespace(device="cpu", dtype="fp32", seed=0, warmup=1, steps=1, windows=3)
    row = gpt2_train.run_variant("eager", TINY, 32, 2, args)
    assert row["tokens_per_s"] > 0 and row["first_loss"] == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=0.05)
    # the reported step is the median of the timed windows
    assert len(row["ms_windows"]) == 3 and row["ms"] == sorted(row["ms_windows"])[1]
    assert row["host_ms"] in row["host_ms_windows"]
    rows = [row, {"seq": 32, "batch": 2, "variant": "flashfx", "oom": "OutOfMemoryError: (a test row)"}]
    gpt2_train.check_losses(rows)
    assert rows[0]["loss_ok"]
    text = "\n".join(gpt2_train.table(rows))
    assert "| 32 | 2 | eager |" in text and "| 32 | 2 | flashfx | OOM |" in text
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines())
    env = {"gpu": "CPU", "torch": torch.__version__, "triton": "-", "date": "today"}
    assert "GPT-2 small" in gpt2_train.markdown(rows, env, args, "tiny config.")
    # where a run wrote its files stays out of the report's command line
    assert gpt2_train._command_args(["--seqs", "64", "--partial", "/x/p.json", "--out-dir=/y", "--no-doc"]) == ["--seqs", "64"]
    pytest.importorskip("matplotlib")
    gpt2_train.plot(rows, tmp_path / "plot.png", "tiny")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_profiled_steps_report_host_time_by_operator():
    """--profile N: N more steps under torch.profiler after timing, the host's time by operator."""
    args = SimpleNamespace(device="cpu", dtype="fp32", seed=0, warmup=1, steps=1, windows=1, profile=2)
    row = gpt2_train.run_variant("eager", TINY, 32, 2, args)
    prof = row["profile"]
    assert prof["steps"] == 2 and prof["host_ms_per_step"] > 0
    assert "aten::mm" in prof["host"] or "aten::addmm" in prof["host"]
    assert "gpu" not in prof  # CPU only
    assert "profile" not in gpt2_train.run_variant("eager", TINY, 32, 2, SimpleNamespace(**{**vars(args), "profile": 0}))


def test_interleaved_windows_take_turns_and_a_failure_stays_in_its_row(monkeypatch):
    """The default timing: every variant compiled first, then windows in turns, each window
    starting one variant later; a variant that fails to build leaves an error row, not a gap."""
    order = []
    real_window = gpt2_train.VariantRun.window

    def window(self):
        order.append(self.variant)
        return real_window(self)

    monkeypatch.setattr(gpt2_train.VariantRun, "window", window)
    args = SimpleNamespace(device="cpu", dtype="fp32", seed=0, warmup=1, steps=1, windows=3)
    rows = gpt2_train.run_interleaved(["eager", "flashfx"], TINY, 32, 2, args)
    assert order == ["eager", "flashfx", "flashfx", "eager", "eager", "flashfx"]
    assert [r["variant"] for r in rows] == ["eager", "flashfx"]
    assert all(len(r["ms_windows"]) == 3 and r["ms"] == sorted(r["ms_windows"])[1] for r in rows)
    assert rows[1]["all_fused"]
    gpt2_train.check_losses(rows)
    assert rows[1]["loss_ok"]

    real_init = gpt2_train.VariantRun.__init__

    def init(self, variant, *a):
        if variant == "eager":
            raise RuntimeError("a test failure")
        real_init(self, variant, *a)

    monkeypatch.setattr(gpt2_train.VariantRun, "__init__", init)
    order.clear()
    rows = gpt2_train.run_interleaved(["eager", "flashfx"], TINY, 32, 2, args)
    assert "a test failure" in rows[0]["error"] and "tokens_per_s" in rows[1]
    assert order == ["flashfx"] * 3


def test_own_bytes_counts_each_storage_the_variant_keeps_once():
    # the peak's resting part: parameters (the tied embedding once), buffers, AdamW state, batch
    model, run, opt = gpt2_train.build("eager", TINY, "cpu", 0)
    x, y = _batch()
    gpt2_train.train_step(run, opt, x, y, lambda: torch.autocast("cpu", enabled=False))
    params = {p.untyped_storage().data_ptr(): p.nbytes for p in model.parameters()}
    assert model.lm_head.weight.untyped_storage().data_ptr() in params  # tied: one storage
    buffers = sum(b.nbytes for b in model.buffers())
    state = sum(t.nbytes for s in opt.state.values() for t in s.values())
    assert state >= 2 * sum(params.values())  # exp_avg and exp_avg_sq
    want = sum(params.values()) + buffers + state + x.nbytes + y.nbytes
    assert gpt2_train.own_bytes(model, opt, (x, y)) == want
