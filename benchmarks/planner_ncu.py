"""The cost model's forward HBM bytes against the DRAM bytes Nsight Compute measures.

    PYTHONPATH=. python3 benchmarks/planner_ncu.py              # every shape, one ncu run each
    PYTHONPATH=. python3 benchmarks/planner_ncu.py --dry-run    # no GPU: shapes, predictions, commands
    PYTHONPATH=. python3 benchmarks/planner_ncu.py --shapes 128:4096,64:1024:causal

Acceptance: the predicted forward HBM bytes lie within ±25% of the measured DRAM bytes (read +
write) at 3 or more shapes.

For each shape the driver runs, as a subprocess,

    ncu --kernel-name regex:_attn_fwd --launch-skip 1 --launch-count 1
        --metrics dram__bytes_read.sum,dram__bytes_write.sum --csv --print-units base
        python3 benchmarks/planner_ncu.py --child D:N:full|causal:G

Shapes: D in {64, 128} x N in {1024, 4096} x (full, causal); GQA 4 at D=128, N=4096; D=256 at
N=4096; and D=256 at N=16384, where the model predicts K/V re-reads that miss L2 (so more than
the compulsory bytes) — the shapes that test its L2 term rather than its compulsory I/O.
The child plans the forward for that exact call (N, B·H, causal, GQA group; bf16, H = 16,
B = 16384 // N) and launches it twice with those tiles: the first launch compiles and is
skipped, the second is measured. ncu flushes the caches before it measures (--cache-control
all, its default), so the kernel starts with a cold L2, as the model assumes. The child prints
the plan and its prediction on a line of its own; the driver parses that and ncu's CSV.

Writes planner_ncu.json/.md to docs/ on CUDA (copies under $OUT when set), or to --out-dir.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.planner_sweep import TOKENS, Shape, cfg_text, planner_plan, program_for, tiles_of  # noqa: E402

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
MARK = "PLANNER_NCU "  # the child's line with the plan and the prediction
TOLERANCE = 0.25
UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
         "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30}


def all_shapes() -> list[Shape]:
    out = [Shape(D, N, TOKENS // N, 16, 16, c) for D in (64, 128) for N in (1024, 4096) for c in (False, True)]
    out += [Shape(128, 4096, TOKENS // 4096, 16, 4, c) for c in (False, True)]  # GQA: K/V read once a group
    out.append(Shape(256, 4096, TOKENS // 4096, 16, 16, False))
    # where the model has K/V re-reads miss L2 (a head's K/V over half of it): predicted >> compulsory
    out += [Shape(256, 16384, 1, 16, 16, c) for c in (False, True)]
    return out


def spec(s: Shape) -> str:
    return f"{s.D}:{s.N}:{'causal' if s.causal else 'full'}:{s.group}"


def parse_spec(text: str) -> Shape:
    D, N, mask, group = text.split(":")
    return Shape(int(D), int(N), TOKENS // int(N), 16, 16 // int(group), mask == "causal")


def select(shapes: list[Shape], wanted: str | None) -> list[Shape]:
    """--shapes D:N[:full|causal][:mha|gqa], comma-separated."""
    if not wanted:
        return shapes

    def match(s, tok):
        parts = tok.split(":")
        ok = int(parts[0]) == s.D and (len(parts) < 2 or int(parts[1]) == s.N)
        for p in parts[2:]:
            ok &= {"full": not s.causal, "causal": s.causal, "mha": s.group == 1, "gqa": s.group > 1}[p]
        return ok

    return [s for s in shapes if any(match(s, t) for t in wanted.split(","))]


def compulsory_bytes(s: Shape, elt: int = 2) -> int:
    """What any forward must move: read q, k, v; write out and the two fp32 row statistics."""
    return elt * s.B * s.N * s.D * (2 * s.H + 2 * s.Hk) + 8 * s.B * s.H * s.N


def prediction(s: Shape, gpu, elt: int = 2) -> dict:
    tp, keywords = planner_plan(s, gpu, elt, interpret=False)
    return {"tiles": list(tiles_of(tp, "fwd")), "predicted_bytes": tp.fwd.hbm_bytes,
            "predicted_tile_bytes": getattr(tp.fwd, "tile_bytes", None),
            "predicted_us": round(tp.fwd.time_s * 1e6, 1), "plan_keywords": keywords}


# ---- the child: one shape's forward, twice -----------------------------------------------------


def child(text: str) -> int:
    import torch
    import triton

    from flashfx.planner import hardware
    from flashfx.runtime import gpu

    s = parse_spec(text)
    g = hardware.current()
    tp, _ = planner_plan(s, g, 2, interpret=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(s.B, s.H, s.N, s.D, device="cuda", dtype=torch.bfloat16, generator=gen)  # [B, H, N, D]
    k, v = (torch.randn(s.B, s.Hk, s.N, s.D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    prog = program_for(s)
    for _ in range(2):  # the first compiles (skipped by ncu), the second is measured
        gpu.forward(q, k, v, [], prog, tiles=tp)
    torch.cuda.synchronize()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "plan": tp.summary() if hasattr(tp, "summary") else ""}
    print(MARK + json.dumps({**prediction(s, g), **info}), flush=True)
    return 0


# ---- the driver ---------------------------------------------------------------------------------


def find_ncu(given: str | None) -> str | None:
    if given:
        return given if os.path.exists(given) or shutil.which(given) else None
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu",
                    "/usr/local/cuda*/nsight-compute*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def ncu_version(ncu: str) -> str:
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return next((ln.strip() for ln in out.splitlines() if "version" in ln.lower()), out.strip()[:80] or "?")


def ncu_command(ncu: str, s: Shape, units: bool = True) -> list[str]:
    return [ncu, "--kernel-name", "regex:_attn_fwd", "--launch-skip", "1", "--launch-count", "1",
            "--metrics", ",".join(METRICS), "--csv", *(["--print-units", "base"] if units else []),
            sys.executable, os.path.abspath(__file__), "--child", spec(s)]


def parse_csv(text: str) -> dict[str, float]:
    """{metric: bytes} from ncu's --csv output (other lines, the child's and ncu's, ignored)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    start = next((i for i, ln in enumerate(lines) if '"Metric Name"' in ln), None)
    if start is None:
        return {}
    out = {}
    for row in csv.DictReader(lines[start:]):
        name, unit, value = row.get("Metric Name"), (row.get("Metric Unit") or "byte"), row.get("Metric Value")
        if name not in METRICS or value in (None, "", "n/a"):
            continue
        scale = UNITS.get(unit.strip().lower().replace(" ", ""))
        if scale is None:
            continue
        out[name] = out.get(name, 0.0) + float(value.replace(",", "")) * scale
    return out


def child_info(text: str) -> dict:
    for ln in text.splitlines():
        if ln.startswith(MARK):
            return json.loads(ln[len(MARK):])
    return {}


class NcuError(RuntimeError):
    """ncu cannot profile at all here: stop, and say why."""


def measure(ncu: str, s: Shape, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    units = True
    for _ in range(2):
        try:
            proc = subprocess.run(ncu_command(ncu, s, units), capture_output=True, text=True, timeout=timeout,
                                  env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"ncu took over {timeout:.0f} s"}
        except PermissionError as e:
            raise NcuError(f"cannot run {ncu}: {e}") from None
        text = proc.stdout + "\n" + proc.stderr
        if units and "--print-units" in text and ("unrecognised" in text or "unrecognized" in text):
            units = False  # an older ncu: parse its scaled units instead
            continue
        break
    if "ERR_NVGPUCTRPERM" in text:
        raise NcuError("ncu may not read the GPU's performance counters (ERR_NVGPUCTRPERM): run as root, or load "
                       "the nvidia module with NVreg_RestrictProfilingToAdminUsers=0")
    found = parse_csv(text)
    info = child_info(text)
    row = {**info}
    if set(found) != set(METRICS):
        tail = "\n".join(text.strip().splitlines()[-8:])
        row["error"] = f"no {'/'.join(METRICS)} for _attn_fwd in ncu's output (exit {proc.returncode}): {tail[-600:]}"
        return row
    row.update(read_bytes=found[METRICS[0]], write_bytes=found[METRICS[1]],
               measured_bytes=found[METRICS[0]] + found[METRICS[1]])
    return row


def _mib(b) -> str:
    return f"{b / 2**20:.1f}" if b else "—"


def table(rows: list[dict]) -> list[str]:
    out = ["| shape | B | fwd tiles | predicted MiB | compulsory MiB | DRAM read MiB | DRAM write MiB | "
           "measured MiB | measured / predicted | within ±25% |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        out.append(f"| {r['label']} | {r['B']} | {cfg_text(r.get('tiles'))} | {_mib(r.get('predicted_bytes'))} | "
                   f"{_mib(r['compulsory_bytes'])} | {_mib(r.get('read_bytes'))} | {_mib(r.get('write_bytes'))} | "
                   f"{_mib(r.get('measured_bytes'))} | {f'{ratio:.3f}' if ratio else '—'} | "
                   f"{('yes' if r['within'] else 'no') if ratio else r.get('error', '—')[:80]} |")
    return out


def markdown(result: dict) -> str:
    env, n = result["env"], result["within"]
    lines = [
        "## Planner: predicted forward HBM bytes against measured DRAM bytes",
        "",
        f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; {env['date']}; "
        f"`{result['command']}`.",
        "",
        "Each forward (bf16, H = 16, B = 16384 // N, scale(D^-0.5), causal top-left) runs with the planner's tiles "
        "for that exact call; ncu measures the second launch (`dram__bytes_read.sum + dram__bytes_write.sum`, "
        "caches flushed first). `predicted`: the plan's `fwd.hbm_bytes`; `compulsory`: q, k, v read and out and "
        "the row statistics written once.",
        "",
        f"Acceptance (>= 3 shapes within ±25%): **{'PASS' if n >= 3 else 'FAIL'}** — {n} of "
        f"{len(result['rows'])} shapes.",
        "",
        *table(result["rows"]),
        "",
    ]
    return "\n".join(lines)


def write(result: dict, args) -> list[str]:
    on_gpu = bool(result["env"].get("gpu"))
    docs = on_gpu and not args.out_dir and not args.no_doc
    scratch = args.out_dir or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "out")
    dirs = [os.path.join(ROOT, "docs")] + ([os.environ["OUT"]] if os.environ.get("OUT") else []) if docs else [scratch]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "planner_ncu.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(d, "planner_ncu.md"), "w") as f:
            f.write(markdown(result))
    return dirs


def row_for(s: Shape) -> dict:
    return {"label": s.label, "D": s.D, "N": s.N, "B": s.B, "H": s.H, "Hk": s.Hk, "causal": s.causal,
            "compulsory_bytes": compulsory_bytes(s)}


def dry_run(args, shapes) -> int:
    from flashfx.planner import hardware

    g = hardware.KNOWN["H200"]
    print(f"dry run: predictions for {g.name} (hardware.KNOWN), bf16\n")
    rows = [{**row_for(s), **prediction(s, g)} for s in shapes]
    print("| shape | B | fwd tiles | predicted MiB | compulsory MiB | predicted / compulsory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['B']} | {cfg_text(r['tiles'])} | {_mib(r['predicted_bytes'])} | "
              f"{_mib(r['compulsory_bytes'])} | {r['predicted_bytes'] / r['compulsory_bytes']:.3f} |")
    ncu = find_ncu(args.ncu) or "ncu"
    print("\nper shape the driver runs, e.g.:\n  " + " ".join(ncu_command(ncu, shapes[0])))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="only these, e.g. 128:4096,64:1024:causal")
    p.add_argument("--ncu", default=None, help="path of ncu (default: PATH, /usr/local/cuda/bin, /opt/nvidia)")
    p.add_argument("--child-timeout", type=float, default=180.0, help="seconds for one shape's ncu run")
    p.add_argument("--budget-s", type=float, default=520.0, help="start no new shape after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="no GPU: shapes, predictions for an H200, the commands")
    p.add_argument("--out-dir", default=None, help="write results here, not to docs/")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    shapes = select(all_shapes(), args.shapes)
    if not shapes:
        print("no shape matches --shapes")
        return 1
    if args.dry_run:
        return dry_run(args, shapes)
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("ncu (Nsight Compute) not found on PATH, in /usr/local/cuda/bin or /opt/nvidia/nsight-compute; "
              "install it or pass --ncu /path/to/ncu")
        return 2

    t0 = time.time()
    result = {"env": {"date": datetime.date.today().isoformat(), "ncu": ncu_version(ncu)},
              "command": " ".join(["PYTHONPATH=. python3 benchmarks/planner_ncu.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "tolerance": TOLERANCE, "rows": [], "within": 0}
    status = 0
    for s in shapes:
        if time.time() - t0 > args.budget_s:
            print(f"time budget reached: {len(result['rows'])} of {len(shapes)} shapes measured")
            break
        try:
            row = {**row_for(s), **measure(ncu, s, args.child_timeout)}
        except NcuError as e:
            print(f"ncu cannot profile here: {e}")
            status = 3
            break
        for key in ("gpu", "torch", "triton", "cuda"):
            if key in row:
                result["env"][key] = row.pop(key)
        if row.get("measured_bytes") and row.get("predicted_bytes"):
            row["ratio"] = row["measured_bytes"] / row["predicted_bytes"]
            row["within"] = abs(row["ratio"] - 1) <= TOLERANCE
        result["rows"].append(row)
        result["within"] = sum(1 for r in result["rows"] if r.get("within"))
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else row.get("error", "")[:300]
        print(f"[{time.time() - t0:6.1f}s] {s.label:26} tiles {cfg_text(row.get('tiles'))}: predicted "
              f"{_mib(row.get('predicted_bytes'))} MiB, measured {_mib(row.get('measured_bytes'))} MiB "
              f"(read {_mib(row.get('read_bytes'))}, write {_mib(row.get('write_bytes'))}): {ratio}", flush=True)
    if result["rows"]:
        dirs = write(result, args)
        print(f"\nwrote planner_ncu.json, .md under {', '.join(dirs)}\n")
        print(markdown(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
