"""benchmarks/sm90_registers.py compiles a generated kernel for sm_90 and reads ptxas's counts,
without a GPU."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sm90_registers  # noqa: E402
from tests.compiled import in_child  # noqa: E402


def test_one_kernel_compiles_for_sm90_and_reports_registers():
    row = in_child("benchmarks.sm90_registers:compile_one", ["dq", 64, 64, 32, 4, 1], "tf32x3")
    assert "error" not in row, row
    assert 64 < row["regs"] <= 255 and row["spill"] == 0 and row["smem"] > 0
    jobs = sm90_registers.grid()
    assert ("dq", 64, 64, 32, 4, 1) in jobs and all(j[0] in sm90_registers.KERNELS for j in jobs)
