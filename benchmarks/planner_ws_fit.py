"""Fit the cost model's constants for the warp-specialized kernels, and say how well they predict.

    PYTHONPATH=. python3 benchmarks/planner_ws_fit.py                 # fit, print, compare
    PYTHONPATH=. python3 benchmarks/planner_ws_fit.py --check         # the constants in cost.py
    PYTHONPATH=. python3 benchmarks/planner_ws_fit.py --check --doc docs/planner_ws.md

The Gluon kernels' tiles are fixed, so the model predicts their time from the work of the SM
that finishes last (`cost.ws_work`: streamed blocks and units) and two constants per kernel and
head dim (`cost.WsCalibration`): time = launch + (steps · step_cycles + units · unit_cycles) /
clock. Those are fitted here by least squares on cycles, with both kept non-negative, to the
measured times in docs/planner_ws.json (H200, bf16), which names the run each point comes from.

Reported per point: measured µs, predicted µs, predicted / measured, and the same with the point
left out of its group's fit (what the model does on a shape it was not fitted to). Where the run
also timed the generated kernel at the planner's tiles, the last columns compare which of the two
was faster, measured and predicted (the generated kernel's time predicted by `cost.predict` at
the tiles `plan.plan` chooses): whether the model would make the measured choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from flashfx.planner import cost, hardware  # noqa: E402
from flashfx.planner.plan import plan  # noqa: E402

DATA = os.path.join(ROOT, "docs", "planner_ws.json")


def shape_of(p: dict) -> cost.Shape:
    return cost.Shape(p["N"], p["N"], p["D"], 2, p["causal"], p["H"] // p["Hk"], p["B"] * p["H"])


def heads_first(p: dict) -> bool:
    """The program order the point was measured with (points from before the order was chosen
    were measured with the kernels' grids head by head)."""
    return p.get("heads_first", False)


def fit(points: list[dict], gpu) -> cost.WsCalibration:
    """Least squares of (steps, units) against measured cycles, coefficients kept >= 0."""
    a = np.array([cost.ws_work(p["kernel"], shape_of(p), gpu.sm_count, heads_first(p)) for p in points],
                 dtype=float)
    y = np.array([(p["us"] * 1e-6 - cost.CALIBRATION.launch_s) * gpu.clock_hz for p in points])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    for i in range(2):
        if coef[i] < 0:  # refit on the other column alone
            j = 1 - i
            coef = np.zeros(2)
            coef[j] = max(float(a[:, j] @ y / (a[:, j] @ a[:, j])), 0.0)
            break
    return cost.WsCalibration(step_cycles=round(float(coef[0]), 1), unit_cycles=round(float(coef[1]), 1))


def predicted_us(p: dict, gpu, cal: cost.WsCalibration | None = None) -> float:
    return cost.predict_ws(p["kernel"], shape_of(p), gpu, cal, heads_first(p)).time_s * 1e6


def generated_us(p: dict, gpu) -> float:
    s = shape_of(p)
    t = plan(p["D"], 2, gpu, n_q=s.n_q, n_k=s.n_k, causal=s.causal, group=s.group, batch_heads=s.batch_heads)
    return {"fwd": t.fwd, "dkdv": t.bwd_dkdv, "dq": t.bwd_dq}[p["kernel"]].time_s * 1e6


def groups(points: list[dict]) -> dict:
    out: dict = {}
    for p in points:
        out.setdefault((p["kernel"], p["D"]), []).append(p)
    return out


def report(points: list[dict], gpu, fitted: dict) -> list[dict]:
    rows = []
    for key, members in groups(points).items():
        for i, p in enumerate(members):
            rest = members[:i] + members[i + 1:]
            held_out = fit(rest, gpu) if len(rest) >= 2 else None
            row = dict(kernel=p["kernel"], D=p["D"], label=p["label"], measured=p["us"],
                       predicted=predicted_us(p, gpu, fitted[key]),
                       held_out=predicted_us(p, gpu, held_out) if held_out else None)
            if p.get("generated_us"):
                row["gen_measured"] = p["generated_us"]
                row["gen_predicted"] = generated_us(p, gpu)
                row["ws_faster_measured"] = p["us"] < p["generated_us"]
                row["ws_faster_predicted"] = row["predicted"] < row["gen_predicted"]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report with the constants in cost.py, fit nothing")
    ap.add_argument("--doc", help="also write the report as markdown to this file")
    args = ap.parse_args(argv)
    with open(DATA) as f:
        data = json.load(f)
    gpu = hardware.KNOWN["H200"]
    points = data["points"]
    if args.check:
        fitted = {key: cost.WS_CALIBRATION[key] for key in groups(points)}
    else:
        fitted = {key: fit(members, gpu) for key, members in groups(points).items()}
        print("WS_CALIBRATION = {")
        for (kernel, d), cal in sorted(fitted.items()):
            print(f"    ({kernel!r}, {d}): WsCalibration(step_cycles={cal.step_cycles}, unit_cycles={cal.unit_cycles}),")
        print("}\n")
    rows = report(points, gpu, fitted)
    lines = ["| kernel | D | shape | measured µs | predicted µs | pred / meas | held out / meas "
             "| generated µs, measured / predicted | faster, measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gen = (f"{r['gen_measured']:.0f} / {r['gen_predicted']:.0f}" if "gen_measured" in r else "—")
        faster = (f"{'ws' if r['ws_faster_measured'] else 'generated'} / "
                  f"{'ws' if r['ws_faster_predicted'] else 'generated'}" if "gen_measured" in r else "—")
        held = f"{r['held_out'] / r['measured']:.2f}" if r["held_out"] else "—"
        lines.append(f"| {r['kernel']} | {r['D']} | {r['label']} | {r['measured']:.0f} | {r['predicted']:.0f} | "
                     f"{r['predicted'] / r['measured']:.2f} | {held} | {gen} | {faster} |")
    errs = [abs(r["predicted"] / r["measured"] - 1) for r in rows]
    held = [abs(r["held_out"] / r["measured"] - 1) for r in rows if r["held_out"]]
    agree = [r["ws_faster_measured"] == r["ws_faster_predicted"] for r in rows if "gen_measured" in r]
    lines += ["", f"{len(rows)} points: |pred/meas - 1| median {np.median(errs):.3f}, max {max(errs):.3f}; "
                  f"held out median {np.median(held):.3f}, max {max(held):.3f}; "
                  f"faster kernel agrees at {sum(agree)} of {len(agree)} points"]
    print("\n".join(lines))
    if args.doc:
        head = ["## The warp-specialized kernels in the cost model", "",
                f"{data['gpu']}, torch {data['torch']}, triton {data['triton']}, {data['dtype']}; "
                f"`PYTHONPATH=. python3 benchmarks/planner_ws_fit.py{' --check' if args.check else ''}`; "
                "points: docs/planner_ws.json (each names the run it comes from).", "",
                "Predicted (`cost.predict_ws`) against measured kernel times; \"held out\": fitted without "
                "the point. Where the same run timed the generated kernel at the planner's tiles: its "
                "measured and predicted (`cost.predict`) times, and which kernel was faster, measured and "
                "as the two predictions have it.", ""]
        with open(args.doc, "w") as f:
            f.write("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
