"""The attention benchmark's timing in turns and its table, without a GPU (times are made up)."""

import pytest

from benchmarks import attention


def test_variants_take_turns_and_rotate_the_first():
    order = []

    def time_ms(step, first):
        order.append((step(), first))
        return float(len(order))

    steps = {name: (lambda name=name: name) for name in ("flashfx", "cudnn", "flex")}
    times = attention.in_turns(steps, rounds=3, time_ms=time_ms)
    names = [name for name, _ in order]
    # each round times every variant once, starting one variant later than the round before
    assert names == ["flashfx", "cudnn", "flex", "cudnn", "flex", "flashfx", "flex", "flashfx", "cudnn"]
    assert [first for _, first in order] == [True] * 3 + [False] * 6
    assert times == {"flashfx": [1.0, 6.0, 8.0], "cudnn": [2.0, 4.0, 9.0], "flex": [3.0, 5.0, 7.0]}
    assert attention.in_turns({}, rounds=3, time_ms=time_ms) == {}


def test_a_variant_that_fails_to_run_keeps_its_error_and_leaves_the_turns():
    calls = []

    def time_ms(step, first):
        calls.append(step())
        if step() == "flex" and not first:
            raise RuntimeError("out of memory")
        return 1.0

    steps = {name: (lambda name=name: name) for name in ("flashfx", "flex")}
    times = attention.in_turns(steps, rounds=3, time_ms=time_ms)
    assert times["flashfx"] == [1.0, 1.0, 1.0]
    assert isinstance(times["flex"], RuntimeError)
    assert calls.count("flex") == 2  # timed in round 0, failed in round 1, not tried in round 2


def test_table_reports_the_spread_of_flashfx_rounds():
    row = {"D": 64, "N": 1024, "causal": True, "mode": "fwd",
           "flashfx": {"tflops": 400.0, "tflops_rounds": [390.0, 400.0, 410.0], "extra_gib": 0.07,
                       "errors": {"out": 2e-3}},
           "cudnn": {"tflops": 440.0, "tflops_rounds": [440.0, 441.0, 439.0]},
           "flash": {"tflops": 300.0, "extra_gib": 0.06},
           "flex": {"error": "RuntimeError: no"},
           "eager": {"skipped": "too big"}}
    md = attention.markdown([row], attention.VARIANTS, "# t")
    line = md.strip().splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    head = next(x for x in md.splitlines() if x.startswith("| D |"))
    header = [c.strip() for c in head.strip("|").split("|")]
    assert len(cells) == len(header) and header[-1] == "ffx ±%"
    got = dict(zip(header, cells))
    assert got["flashfx"] == "400" and got["flex"] == "err" and got["eager"] == "—"
    assert got["ffx/cuDNN"] == "0.91" and got["ffx ±%"] == "5.0"


def test_the_doc_keeps_its_notes_around_the_new_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    attention.write_doc(str(doc), "# Attention benchmark\n\n| old table |\n")  # a new file: written whole
    first = doc.read_text()
    assert first.startswith(attention.TABLE_BEGIN) and "| old table |" in first
    doc.write_text("# Notes above\n\n" + first + "\nReading of the table, by hand.\n\n## Other benchmarks\n")
    attention.write_doc(str(doc), "# Attention benchmark\n\n| new table |\n")
    text = doc.read_text()
    assert "| new table |" in text and "| old table |" not in text
    assert text.startswith("# Notes above\n\n" + attention.TABLE_BEGIN)
    assert text.endswith(attention.TABLE_END + "\n\nReading of the table, by hand.\n\n## Other benchmarks\n")


def test_plot_draws_every_mode(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"D": 64, "N": 1024, "causal": c, "mode": m, "flashfx": {"tflops": 400.0}, "cudnn": {"error": "x"}}
            for c in (False, True) for m in ("fwd", "fwdbwd")]
    attention.plot(rows, ["flashfx", "cudnn"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
