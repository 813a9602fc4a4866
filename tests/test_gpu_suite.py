"""bench/gpu_suite.py without a GPU: the dry run skips the CUDA steps with their reason and still
writes its files; its report parsers read pytest's JUnit XML and pytest-benchmark's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402

SUITE = [sys.executable, str(ROOT / "bench" / "gpu_suite.py")]


def test_dry_run_skips_the_cuda_steps_and_writes_its_files(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for real")
    out = tmp_path / "out"
    steps = "tests,autotune,bench_pq,bench_attn"
    proc = subprocess.run(
        [*SUITE, str(out), "--steps", steps], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["suite.log", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda"] is False and summary["problems"] == []
    for step in steps.split(","):
        assert summary["steps"][step] == {"status": "skipped", "reason": "no CUDA device (dry run)"}
    log = (out / "suite.log").read_text()
    assert "==== tests: skipped (no CUDA device)" in log and "files: ['suite.log'" in log


def test_bad_arguments_are_refused(tmp_path):
    proc = subprocess.run(
        [*SUITE, str(tmp_path), "--steps", "tests,gpu"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown steps ['gpu']" in proc.stderr
    proc = subprocess.run(SUITE, capture_output=True, text=True)
    assert proc.returncode == 2 and "the output folder is required" in proc.stderr


def _pq(provider, ms, dtype="torch.bfloat16", n=1 << 20, **extra):
    info = dict(N=n, M=16, K=1024, dtype=dtype, provider=provider, ms=ms, **extra)
    return {"extra_info": info}


def test_pq_goal_figures():
    results = [
        _pq("pqmim", 2.0, gflops_per_s=300_000.0, nominal_peak_tflops=1000.0),
        _pq("eager_chunked", 30.0),
        _pq("eager_cdist", 50.0),
        _pq("pqmim", 1.0, n=65_536, gflops_per_s=1.0),  # another shape: not the goal
    ]
    goals = gpu_suite.pq_goals(results)
    assert goals == {
        "pq_assign torch.bfloat16 N=2^20 M=16 K=1024 d=16": {
            "ms": 2.0,
            "tflops": 300.0,
            "best_eager_ms": 30.0,
            "speedup_vs_best_eager": 15.0,
            "fraction_of_peak": 0.3,
            "peak_tflops_used": 1000.0,
        }
    }


def _attn(provider, known, ms, pass_="fwd"):
    shape = {"B": 16, "H": 32, "L": 1024, "Dh": 64}
    return {"extra_info": dict(pass_=pass_, shape=shape, known=known, provider=provider, ms=ms)}


def test_attention_goal_figures():
    results = [
        _attn("pqmim", 1.0, 4.0),
        _attn("flex", 1.0, 5.0),
        _attn("sdpa_gathered", 1.0, 3.0),
        _attn("pqmim", 0.1, 0.5),
        _attn("flex", 0.1, 1.0),
    ]
    assert gpu_suite.attention_goals(results) == {
        "attention fwd Dh=64 L=1024": {
            "flex_over_ours@0.1": 2.0,
            "ours_time_rel_full@0.1": 0.125,
            "flex_over_ours@1.0": 1.25,
            "ours_time_rel_full@1.0": 1.0,
            "sdpa_nomask_over_ours": 0.75,
        }
    }


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.b" name="gone"><skipped message="needs a CUDA device"/>'
        "</testcase></testsuite></testsuites>"
    )
    counts = gpu_suite._pytest_counts(xml)
    assert counts["passed"] == 1 and counts["failures"] == 1 and counts["skipped"] == 1
    assert counts["failed"] == [{"test": "tests.a::bad", "failure": "boom"}]
    assert counts["skip_reasons"] == {"needs a CUDA device": 1}
    assert gpu_suite._pytest_counts(tmp_path / "missing.xml") == {"report": "missing"}
