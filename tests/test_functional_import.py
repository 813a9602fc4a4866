"""Importing pqmim_kernels.functional stays cheap: no torch._dynamo import (about 2 s) at import
time, while torch.compile still treats triton_available() as a constant."""

import subprocess
import sys

import torch


def test_import_and_an_eager_cpu_pq_assign_do_not_load_dynamo():
    code = (
        "import sys, torch, pqmim_kernels.functional as F, pqmim_kernels.models; "
        "F.pq_assign(torch.randn(5, 8), torch.randn(2, 3, 4)); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_triton_available_carries_the_mark_assume_constant_result_sets():
    from pqmim_kernels.functional import triton_available

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    new = set(vars(marked)) - {"__wrapped__"}
    assert new == {"_dynamo_marked_constant"}, new
    assert triton_available._dynamo_marked_constant is marked._dynamo_marked_constant is True
