"""One command that validates and measures the Triton kernels on a CUDA machine.

    python bench/gpu_suite.py OUT_DIR            (or: bash bench/gpu_suite.sh OUT_DIR)
    python bench/gpu_suite.py OUT_DIR --steps tests,autotune --budget-s 240   (a partial rerun)

With the torch and Triton it finds (no package registry needed), in this order, each step
under its own time cap inside one overall budget (default 470 s, sized for an H100/H200):

1. ``install``: ``pip install --no-build-isolation --no-deps -e .`` (on failure the later
   steps run from the source tree through ``PYTHONPATH``; the kernels need no compiled code).
2. ``env``: GPU, driver, versions, the device limits the launchers read.
3. ``tests``: every CUDA test (``tests/test_*_cuda.py``, ``test_masked_attention_triton.py``
   on the GPU) and the launch-config tests (prunes per device class, ahead-of-time compiles),
   in parallel workers when pytest-xdist is installed.
4. ``autotune``: in a fresh process with an empty Triton cache, the first-call time
   (compile + autotune) of each kernel at representative shapes, the config each picks, the
   candidates its prune kept, any candidate that failed to compile or launch
   (``OutOfResources``, ptxas errors: the autotuner records them as infinite time), and the
   pinned configs.
5. ``bench_pq``, ``bench_attn``: ``pytest bench/<file> --benchmark-only`` on the GPU grid with
   whatever peers are installed there (the goal shapes run first).

Writes into OUT_DIR (at most 8 files): ``suite.log`` (every step's output), ``summary.json``
(environment, steps, test counts and failures, goal figures read off the benchmarks),
``tests.xml`` (JUnit), ``autotune.json``, ``bench_pq_assign.json`` and
``bench_masked_attention.json`` (pytest-benchmark). ``summary.json`` is rewritten after every
step, so a run cut short still leaves what it measured. Without CUDA every GPU step is skipped
with its reason and the files are still written (a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "env", "tests", "autotune", "bench_pq", "bench_attn")
# Seconds each step may take at most (the overall budget caps them further).
CAPS = {"install": 100, "env": 30, "tests": 200, "autotune": 60, "bench_pq": 75, "bench_attn": 110}
CUDA_TESTS = (
    "tests/test_pq_assign_cuda.py",
    "tests/test_masked_attention_cuda.py",
    "tests/test_masked_attention_triton.py",
    "tests/test_launch.py",
    "tests/test_masked_attention_compile.py",
    "tests/test_pq_assign.py::test_kept_tilings_compile_fit_and_do_not_spill",
    "tests/test_pq_assign.py::test_stats_kernel_compiles_ahead_of_time",
)
GOAL_PQ = {"N": 1 << 20, "M": 16, "K": 1024}  # the pq_assign goal shape (d = 16)


class Suite:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.log = open(out / "suite.log", "a", buffering=1)
        self.summary: dict = {
            "suite": "pqmim-kernels gpu_suite",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv,
            "budget_s": budget_s,
            "steps": {},
            "problems": [],
        }
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")

    def problem(self, text: str) -> None:
        self.say(f"!! {text}")
        self.summary["problems"].append(text)

    def run(self, name: str, cmd: list[str], cap: float, env: dict | None = None) -> dict:
        """Run ``cmd`` with its output streamed to the console and suite.log; SIGINT at the
        time limit (pytest then still writes its reports), SIGKILL 20 s later."""
        limit = max(0.0, min(cap, self.remaining()))
        rec = {"cmd": " ".join(cmd), "cap_s": round(limit, 1)}
        self.say(f"\n==== {name}: {rec['cmd']}  (limit {limit:.0f} s)")
        if limit < 5:
            rec.update(status="skipped", reason="no time left in the budget")
            self.say(f"---- {name}: skipped (no time left)")
            return rec
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        tail: list[str] = []

        def pump():
            assert proc.stdout is not None
            for line in proc.stdout:
                self.say(line.rstrip("\n"))
                tail.append(line.rstrip("\n"))
                del tail[:-40]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"---- {name}: time limit reached, interrupting")
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
        rec.update(
            rc=proc.returncode,
            seconds=round(time.monotonic() - t0, 1),
            timed_out=timed_out,
            status="timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed"),
            tail=tail[-12:],
        )
        self.say(f"---- {name}: {rec['status']} (rc {proc.returncode}, {rec['seconds']} s)")
        return rec


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ---- steps -------------------------------------------------------------------------------------


def step_install(s: Suite) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    rec = s.run("install", cmd, CAPS["install"])
    if rec.get("status") != "ok":
        s.problem("pip install -e . failed: later steps import the package from the source tree")
        s.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), s.env.get("PYTHONPATH")]))
    return rec


def environment() -> dict:
    """Machine, versions and device limits (run in a child so the parent imports no CUDA)."""
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {},
    }
    for name in ("triton", "pytest", "pytest_benchmark", "xdist", "pytest_timeout", "numpy"):
        try:
            mod = __import__(name)
            info["packages"][name] = getattr(mod, "__version__", "present")
        except Exception as exc:
            info["packages"][name] = f"missing ({type(exc).__name__})"
    if torch.cuda.is_available():
        from pqmim_kernels.ops._launch import device_limits

        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2**30, 1),
            "smem_per_block_optin": getattr(p, "shared_memory_per_block_optin", None),
            "regs_per_sm": getattr(p, "regs_per_multiprocessor", None),
        }
        info["device_limits_used"] = device_limits(0).__dict__
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
        out = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    return info


def step_env(s: Suite) -> dict:
    env_file = s.out / ".env.json"
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import gpu_suite; "
        f"open({str(env_file)!r}, 'w').write(json.dumps(gpu_suite.environment(), default=str))"
    )
    rec = s.run("env", [sys.executable, "-c", code], CAPS["env"])
    if env_file.exists():
        s.summary["environment"] = json.loads(env_file.read_text())
        env_file.unlink()
    return rec


def _pytest_counts(xml_path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not xml_path.exists():
        return {"report": "missing"}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            node = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    failed.append({"test": node, tag: (el.get("message") or "")[:300]})
            el = case.find("skipped")
            if el is not None:
                reason = (el.get("message") or "")[:120]
                skipped[reason] = skipped.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed[:40], "skip_reasons": skipped}


def step_tests(s: Suite) -> dict:
    xml = s.out / "tests.xml"
    # -m "": the slow ones too (a plain pytest leaves the compile and kernel tests out).
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "", "-p", "no:cacheprovider"]
    cmd += list(CUDA_TESTS)
    cmd += ["--junitxml", str(xml), "-o", "junit_family=xunit1"]
    if _has("xdist"):  # the tests are bound by compiling (one ptxas per kernel variant)
        cmd += ["-n", str(max(2, min(12, (os.cpu_count() or 4) - 2)))]
    if _has("pytest_timeout"):
        cmd += ["--timeout", "240"]
    rec = s.run("tests", cmd, CAPS["tests"])
    rec["counts"] = _pytest_counts(xml)
    if rec["counts"].get("failures") or rec["counts"].get("errors"):
        s.problem(f"CUDA tests: {len(rec['counts']['failed'])} failed or errored")
    return rec


def step_autotune(s: Suite) -> dict:
    cache = Path("/tmp") / f"pqmim-gpu-suite-triton-cache-{os.getpid()}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(s.env, TRITON_CACHE_DIR=str(cache))  # empty: first calls include compiles
    out = s.out / "autotune.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--autotune-probe", str(out)]
    rec = s.run("autotune", cmd, CAPS["autotune"], env=env)
    if out.exists():
        probe = json.loads(out.read_text())
        rec["cases"] = len(probe.get("cases", []))
        bad = [c for c in probe.get("cases", []) if c.get("failed_configs") or c.get("error")]
        for c in bad:
            s.problem(f"autotune {c['name']}: {c.get('error') or c['failed_configs']}")
        s.summary["autotune_first_call_s"] = {
            c["name"]: c.get("first_call_s") for c in probe.get("cases", [])
        }
    return rec


def step_bench(s: Suite, name: str, file: str) -> dict:
    out = s.out / f"{Path(file).stem}.json"
    cmd = [sys.executable, "-m", "pytest", f"bench/{file}", "--benchmark-only", "-q", "-rs"]
    cmd += ["-p", "no:cacheprovider", "--benchmark-json", str(out)]
    if not _has("pytest_benchmark"):
        return {"status": "skipped", "reason": "pytest-benchmark is not installed"}
    if _has("pytest_timeout"):
        cmd += ["--timeout", "120"]
    rec = s.run(name, cmd, CAPS[name])
    if out.exists():
        try:
            results = json.loads(out.read_text())["benchmarks"]
        except (ValueError, KeyError):
            results = []
        rec["benchmarks"] = len(results)
        goals = s.summary.setdefault("goals", {})
        goals.update(pq_goals(results) if name == "bench_pq" else attention_goals(results))
    return rec


# ---- goal figures read off the benchmark JSON -------------------------------------------------


def pq_goals(results: list[dict]) -> dict:
    """pq_assign at the goal shape: ours vs the best eager path, and our share of peak."""
    rows: dict = {}
    for r in results:
        x = r.get("extra_info", {})
        if {k: x.get(k) for k in GOAL_PQ} != GOAL_PQ:
            continue
        rows.setdefault(x["dtype"], {})[x["provider"]] = x
    goals = {}
    for dtype, by in rows.items():
        ours = by.get("pqmim")
        eager = [v["ms"] for k, v in by.items() if k.startswith("eager")]
        if not ours:
            continue
        g = {"ms": ours["ms"], "tflops": ours["gflops_per_s"] / 1e3}
        if eager:
            g["best_eager_ms"] = min(eager)
            g["speedup_vs_best_eager"] = round(min(eager) / ours["ms"], 2)
        if ours.get("nominal_peak_tflops"):
            g["fraction_of_peak"] = round(g["tflops"] / ours["nominal_peak_tflops"], 3)
            g["peak_tflops_used"] = ours["nominal_peak_tflops"]
        goals[f"pq_assign {dtype} N=2^20 M=16 K=1024 d=16"] = g
    return goals


def attention_goals(results: list[dict]) -> dict:
    """Masked attention: ours / FlexAttention, ours / SDPA with no mask (known = 1), and our
    time at each known fraction relative to all keys known."""
    by: dict = {}
    for r in results:
        x = r.get("extra_info", {})
        sh = x.get("shape", {})
        key = (x.get("pass_"), sh.get("Dh"), sh.get("L"))
        by.setdefault(key, {}).setdefault(x.get("known"), {})[x.get("provider")] = x.get("ms")
    goals = {}
    for (pass_, dh, seqlen), per_known in sorted(by.items(), key=str):
        g = {}
        full = per_known.get(1.0, {})
        for known, prov in sorted(per_known.items()):
            ours = prov.get("pqmim")
            if ours is None:
                continue
            if prov.get("flex"):
                g[f"flex_over_ours@{known}"] = round(prov["flex"] / ours, 2)
            if full.get("pqmim"):
                g[f"ours_time_rel_full@{known}"] = round(ours / full["pqmim"], 3)
        if full.get("pqmim") and full.get("sdpa_gathered"):
            g["sdpa_nomask_over_ours"] = round(full["sdpa_gathered"] / full["pqmim"], 2)
        if g:
            goals[f"attention {pass_} Dh={dh} L={seqlen}"] = g
    return goals


# ---- the autotune probe (run in its own process, with an empty Triton cache) -------------------


def autotune_probe(out_path: str) -> None:
    import torch

    result: dict = {"cases": []}
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device"
        Path(out_path).write_text(json.dumps(result, indent=1))
        return
    import triton

    from pqmim_kernels import functional as F
    from pqmim_kernels.ops import _launch
    from pqmim_kernels.ops import masked_attention as ma
    from pqmim_kernels.ops import pq_assign as pa

    result["triton"] = triton.__version__
    result["device_limits"] = _launch.device_limits(0).__dict__
    dev = "cuda"

    def describe(config):
        if config is None:
            return None
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def tuner_report(tuned):
        timings = getattr(tuned, "configs_timings", None) or {}
        failed = [describe(c) for c, t in timings.items() if t and t[0] == float("inf")]
        return {
            "chosen": describe(getattr(tuned, "best_config", None)),
            "candidates_benchmarked": len(timings),
            "bench_s": round(getattr(tuned, "bench_time", 0.0) or 0.0, 3),
            "failed_configs": failed,
        }

    def case(name, fn, tuners, pinned_fn):
        rec: dict = {"name": name}
        try:
            for t in tuners:  # what a cached key reports: nothing benchmarked
                t.configs_timings, t.bench_time = {}, 0.0
            rec["first_call_s"] = round(timed(fn), 3)
            rec["second_call_ms"] = round(timed(fn) * 1e3, 3)
            rec["kernels"] = [tuner_report(t) for t in tuners]
            failed = [f for k in rec["kernels"] for f in k["failed_configs"]]
            if failed:
                rec["failed_configs"] = failed
            rec["pinned_first_call_s"] = round(timed(pinned_fn), 3)
            rec["pinned_second_call_ms"] = round(timed(pinned_fn) * 1e3, 3)
        except Exception as exc:  # recorded, then the next case runs
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        result["cases"].append(rec)
        Path(out_path).write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(rec, default=str), flush=True)

    gen = torch.Generator(device=dev).manual_seed(0)
    for dtype, prec, n, m, k, d in (
        (torch.float32, "tf32x3", 1 << 20, 16, 1024, 16),
        (torch.bfloat16, "tf32x3", 1 << 20, 16, 1024, 16),
        (torch.float32, "ieee", 1 << 20, 16, 1024, 16),
        (torch.float32, "tf32x3", 1 << 16, 1, 1024, 256),
        (torch.bfloat16, "tf32x3", 1 << 16, 4, 256, 64),
        (torch.float32, "tf32x3", 4096, 16, 1024, 16),  # a second N bucket of the first key
    ):
        z = torch.randn(n, m * d, device=dev, dtype=dtype, generator=gen)
        cb = torch.randn(m, k, d, device=dev, dtype=dtype, generator=gen)
        name = f"pq_assign {str(dtype)[6:]} {prec} N={n} M={m} K={k} d={d}"
        case(
            name,
            lambda z=z, cb=cb, p=prec: F.pq_assign(z, cb, fp32_precision=p),
            [pa._pq_assign_tuned],
            lambda z=z, cb=cb, p=prec: F.pq_assign(z, cb, fp32_precision=p, pinned=True),
        )
        if "N=4096" in name:  # the small call must not have replaced the big bucket's pick
            result["pq_buckets_cached"] = len(pa._pq_assign_tuned.cache)
    for dtype, b, h, seqlen, dh in (
        (torch.float16, 4, 16, 4096, 64),
        (torch.bfloat16, 8, 16, 1024, 128),
        (torch.float32, 2, 8, 512, 256),
    ):
        q, kk, v = (
            torch.randn(b, h, seqlen, dh, device=dev, dtype=dtype, generator=gen).requires_grad_()
            for _ in range(3)
        )
        lengths = torch.full((b,), seqlen // 2, device=dev, dtype=torch.int32)
        grad = torch.randn_like(q)

        def step(q=q, kk=kk, v=v, lengths=lengths, grad=grad, pinned=False):
            out = F.masked_attention(q, kk, v, key_lengths=lengths, pinned=pinned)
            torch.autograd.grad(out, (q, kk, v), grad)

        case(
            f"masked_attention fwd+bwd {str(dtype)[6:]} B={b} H={h} L={seqlen} Dh={dh}",
            step,
            [ma._fwd_tuned, ma._bwd_dq_tuned, ma._bwd_dkdv_tuned],
            lambda step=step: step(pinned=True),
        )
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))


# ---- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output folder (created)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    ap.add_argument("--budget-s", type=float, default=470.0, help="overall time budget")
    ap.add_argument("--autotune-probe", metavar="JSON", help=argparse.SUPPRESS)
    # Development: run the GPU steps on a CPU machine too (tiny benchmark grids), to check the
    # suite's own plumbing; the CUDA test files skip themselves there.
    ap.add_argument("--plumbing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.autotune_probe:
        autotune_probe(args.autotune_probe)
        return 0
    if not args.out:
        ap.error("the output folder is required")
    steps = [x for x in args.steps.split(",") if x]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; choose from {STEPS}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = Suite(out, args.budget_s)
    cuda = cuda_available()
    if args.plumbing and not cuda:
        cuda = True
        s.env.update(PQMIM_BENCH_PQ_GRID="tiny", PQMIM_BENCH_ATTN_GRID="tiny")
    s.summary["cuda"] = cuda
    s.say(f"gpu_suite: out={out} steps={steps} budget={args.budget_s:.0f}s cuda={cuda}")
    gpu_only = {"tests", "autotune", "bench_pq", "bench_attn"}
    for name in steps:
        if name in gpu_only and not cuda:
            rec = {"status": "skipped", "reason": "no CUDA device (dry run)"}
            s.say(f"\n==== {name}: skipped (no CUDA device)")
        elif name == "install":
            rec = step_install(s)
        elif name == "env":
            rec = step_env(s)
        elif name == "tests":
            rec = step_tests(s)
        elif name == "autotune":
            rec = step_autotune(s)
        elif name == "bench_pq":
            rec = step_bench(s, name, "bench_pq_assign.py")
        else:
            rec = step_bench(s, name, "bench_masked_attention.py")
        s.summary["steps"][name] = rec
        s.save()
    s.summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    s.summary["seconds"] = round(args.budget_s - s.remaining(), 1)
    s.save()
    s.say("\n==== summary")
    for name, rec in s.summary["steps"].items():
        extra = rec.get("counts") or rec.get("benchmarks") or rec.get("reason") or ""
        if isinstance(extra, dict):
            extra = {k: v for k, v in extra.items() if k in ("passed", "failures", "errors")}
        s.say(f"{name:>11}: {rec.get('status')} {rec.get('seconds', '')} s {extra}")
    for key, g in s.summary.get("goals", {}).items():
        s.say(f"goal {key}: {json.dumps(g)}")
    for p in s.summary["problems"]:
        s.say(f"problem: {p}")
    s.say(f"files: {sorted(p.name for p in out.iterdir())}")
    failed = [n for n, r in s.summary["steps"].items() if r.get("status") in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
