"""benchmarks/sm90_registers.py compiles a generated kernel for sm_90 and reads ptxas's counts,
without a GPU."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sm90_registers  # noqa: E402
from tests.compiled import in_child  # noqa: E402


def test_one_kernel_compiles_for_sm90_and_reports_registers():
    row = in_child("benchmarks.sm90_registers:compile_one", ["dq", 64, 64, 32, 4, 1, False, True], "tf32x3")
    assert "error" not in row, row
    assert 64 < row["regs"] <= 255 and row["spill"] == 0 and row["smem"] > 0
    jobs = sm90_registers.grid()
    assert ("dq", 64, 64, 32, 4, 1, False, True) in jobs and all(j[0] in sm90_registers.KERNELS for j in jobs)


def test_dkdv_grid_has_both_orientations_causal_and_not():
    jobs = sm90_registers.dkdv_grid()
    assert {(j[6], j[7]) for j in jobs} == {(False, False), (False, True), (True, False), (True, True)}
    assert ("dkdv", 128, 32, 64, 4, 3, True, True) in jobs  # keys down: 32-row Q tiles are sound
    assert not any(j[2] == 32 and j[3] > 32 and not j[6] for j in jobs)  # queries down they are not
