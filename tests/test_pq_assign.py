"""pq_assign / pq_quantize: eager spec, chunked CPU path, custom op, Triton kernel (interpreter).

The Triton cases run in one subprocess with TRITON_INTERPRET=1 set before Triton is imported
(robust whatever the rest of the suite imported first); the parent checks the results.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pq_cases import (  # noqa: E402
    assert_argmin_criterion,
    clustered_inputs,
    make_inputs,
    round_to_tf32,
)

import pqmim_kernels  # noqa: E402
from pqmim_kernels import functional as F  # noqa: E402
from pqmim_kernels.reference import pq as ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--pq-triton-worker"

# (leading shape, M, K, d): ragged on purpose (N not a block multiple, K = 300, d = 12, d = 1).
SHAPES = [
    ((1,), 1, 1, 1),
    ((37,), 3, 300, 12),
    ((2, 5, 7), 4, 17, 8),
    ((129,), 2, 64, 16),
    ((3, 11), 5, 33, 3),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- eager spec and chunked CPU path --------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_matches_naive(shape, dtype):
    lead, m, k, d = shape
    z, cb = make_inputs(lead, m, k, d, dtype)
    # A tiny chunk budget forces many row chunks, including a ragged last one.
    codes, dists = ref.pq_assign_chunked(z, cb, max_chunk_bytes=4 * m * k * 5)
    assert codes.shape == (*lead, m) and dists.shape == (*lead, m)
    assert_argmin_criterion(z, cb, codes, dists)
    naive_codes, naive_d = ref.pq_assign_naive(z, cb)
    assert naive_codes.shape == codes.shape
    torch.testing.assert_close(dists.double(), naive_d, rtol=1e-5, atol=1e-5)


def test_public_pq_assign_uses_chunked_path_on_cpu():
    z, cb = make_inputs((4, 9), 3, 300, 12, torch.float32, seed=3)
    codes, dists = pqmim_kernels.pq_assign(z, cb, return_distances=True)
    exp_codes, exp_d = ref.pq_assign_chunked(z, cb)
    assert torch.equal(codes, exp_codes) and torch.equal(dists, exp_d)
    assert torch.equal(pqmim_kernels.pq_assign(z, cb, backend="reference"), exp_codes)


def test_near_ties_criterion_with_clustered_codebook():
    # Codewords only 1e-4 apart: the expanded score cannot order them, the criterion still holds.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 1, 8, generator=g) * 10
    cb = base + 1e-4 * torch.randn(2, 50, 8, generator=g)
    z = base.reshape(1, 16) + 1e-4 * torch.randn(200, 16, generator=g)
    codes, dists = F.pq_assign(z, cb, return_distances=True)
    assert_argmin_criterion(z, cb, codes, dists)


def test_clustered_inputs_defeat_plain_tf32():
    """The clustered case discriminates: a plain TF32 dot (operands rounded to TF32, products
    exact, ‖c‖² in fp32 as the kernel sums it) misses the argmin criterion in most rows, fp32
    meets it (the interpreter and CUDA tests run the tf32x3 kernel on the same inputs)."""
    z, cb = clustered_inputs(64, 2, 300, 8)
    zt, ct = round_to_tf32(z).double(), round_to_tf32(cb).double()
    dots = torch.einsum("nmd,mkd->nmk", zt.reshape(-1, 2, 8), ct)
    scores = (cb.double() ** 2).sum(-1)[None] - 2 * dots
    with pytest.raises(AssertionError):
        assert_argmin_criterion(z, cb, scores.argmin(-1), None)
    codes, dists = ref.pq_assign_chunked(z, cb)
    assert_argmin_criterion(z, cb, codes, dists)


def test_exact_ties_go_to_lowest_index():
    # Integer values keep every score exact, so equal distances compare equal (see the Triton
    # tie case for why general floats cannot promise that through a matmul).
    g = torch.Generator().manual_seed(0)
    cb = torch.randint(-2, 3, (2, 300, 4), generator=g).float()
    cb[0, 4] = cb[0, 1]
    cb[0, 250] = cb[0, 1]
    cb[1] = 7.0  # all codewords of sub-space 1 identical
    z = torch.cat([cb[0, 1], torch.randn(4)]).repeat(3, 1)
    for chunk in (ref.DEFAULT_CHUNK_BYTES, 4 * 2 * 300):
        codes, _ = ref.pq_assign_chunked(z, cb, max_chunk_bytes=chunk)
        assert codes.tolist() == [[1, 0]] * 3
    # Equidistant by symmetry: z halfway between two codewords.
    cb2 = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]]])
    z2 = torch.zeros(1, 2)
    assert F.pq_assign(z2, cb2).tolist() == [[0]]
    assert F.pq_assign(z2, cb2[:, [1, 0, 2]]).tolist() == [[0]]


def test_any_strides_and_empty_input():
    _, cb = make_inputs((1,), 4, 17, 10, torch.float32)
    big = torch.randn(20, 3, 40)
    z_strided = big[::2, 1, :]  # (10, 40), non-contiguous rows
    z_t = torch.randn(40, 7).t()  # (7, 40), column-major
    for zz in (z_strided, z_t):
        assert not zz.is_contiguous()
        codes, dists = F.pq_assign(zz, cb, return_distances=True)
        exp_codes, exp_d = F.pq_assign(zz.contiguous(), cb, return_distances=True)
        assert torch.equal(codes, exp_codes)
        # The reduction order of the direct distance may follow the memory layout.
        torch.testing.assert_close(dists, exp_d, rtol=1e-6, atol=1e-6)
    empty = torch.empty(0, 3, 40)
    codes, dists = F.pq_assign(empty, cb, return_distances=True)
    assert codes.shape == (0, 3, 4) and dists.shape == (0, 3, 4)


def test_chunk_budget_bounds_the_score_block(monkeypatch):
    seen = []
    real = torch.baddbmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "baddbmm", spy)
    z, cb = make_inputs((1000,), 4, 256, 4, torch.float32)
    budget = 256 * 1024
    codes, _ = ref.pq_assign_chunked(z, cb, max_chunk_bytes=budget)
    assert len(seen) == -(-1000 // 64) and max(seen) <= budget  # 64 rows per chunk
    # At the CPU shape (N = 262,144, M = 16, K = 1024) the default budget holds the
    # score block to 64 MiB instead of the naive 16 GiB.
    rows = ref.DEFAULT_CHUNK_BYTES // (4 * 16 * 1024)
    assert rows * 16 * 1024 * 4 <= 64 * 2**20


def test_pq_lookup_and_quantize_straight_through():
    z, cb = make_inputs((3, 5), 4, 17, 6, torch.float32)
    z.requires_grad_(True)
    cb.requires_grad_(True)
    zq, codes = F.pq_quantize(z, cb)
    expected = torch.stack([cb[m, codes[..., m]] for m in range(4)], dim=-2).reshape(3, 5, 24)
    assert torch.equal(zq, expected)  # forward value is exactly the codewords
    upstream = torch.randn_like(zq)
    zq.backward(upstream)
    assert torch.equal(z.grad, upstream)  # straight-through
    exp_cb_grad = torch.zeros_like(cb)
    up = upstream.reshape(-1, 4, 6)
    for m in range(4):
        exp_cb_grad[m].index_add_(0, codes.reshape(-1, 4)[:, m], up[:, m])
    torch.testing.assert_close(cb.grad, exp_cb_grad)


def test_pq_quantize_keeps_input_dtype():
    z, cb = make_inputs((9,), 2, 10, 4, torch.bfloat16)
    zq, codes = F.pq_quantize(z, cb.float())
    assert zq.dtype == torch.bfloat16 and codes.dtype == torch.int64


def test_ema_statistics_match_definition():
    z, cb = make_inputs((50,), 3, 7, 4, torch.float32)
    codes = F.pq_assign(z, cb)
    counts, sums = F.pq_ema_statistics(z, codes, 7)
    zs = z.reshape(50, 3, 4)
    for m in range(3):
        for k in range(7):
            sel = codes[:, m] == k
            assert counts[m, k] == sel.sum()
            torch.testing.assert_close(sums[m, k], zs[sel, m].sum(0), rtol=1e-6, atol=1e-6)


# ---- custom op and torch.compile ------------------------------------------------------------


def test_custom_op_passes_opcheck():
    z, cb = make_inputs((13,), 3, 20, 4, torch.float32)
    for with_distances in (True, False):
        torch.library.opcheck(
            F._pq_assign_op, (z, cb, "reference", with_distances, "tf32x3", False)
        )


def test_codes_do_not_depend_on_distance_request():
    z, cb = make_inputs((41,), 3, 300, 12, torch.float32, seed=9)
    codes, none = ref.pq_assign_chunked(z, cb, with_distances=False)
    assert none is None
    assert torch.equal(codes, ref.pq_assign_chunked(z, cb)[0])
    assert torch.equal(F.pq_assign(z, cb), codes)


def test_torch_compile_fullgraph_has_no_graph_break():
    import torch._dynamo

    torch._dynamo.reset()
    z, cb = make_inputs((2, 9), 3, 20, 4, torch.float32)

    def f(z, cb):
        codes, dists = F.pq_assign(z * 2.0, cb, return_distances=True)
        return codes + 1, dists.sum(-1)

    explanation = torch._dynamo.explain(f)(z, cb)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(z, cb)
    exp = f(z, cb)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "cb", "exc", "match"),
    [
        ("not a tensor", torch.zeros(2, 3, 4), TypeError, "z must be a torch.Tensor"),
        (torch.zeros(5, 8), [[1.0]], TypeError, "codebooks must be a torch.Tensor"),
        (torch.zeros(5, 8, dtype=torch.float64), torch.zeros(2, 3, 4), TypeError, "z must be"),
        (torch.zeros(5, 8, dtype=torch.int32), torch.zeros(2, 3, 4), TypeError, "got torch.int32"),
        (torch.zeros(5, 8), torch.zeros(2, 3, 4, dtype=torch.float64), TypeError, "codebooks must"),
        (torch.zeros(5, 8), torch.zeros(6, 4), ValueError, r"shape \(M, K, d\)"),
        (torch.tensor(1.0), torch.zeros(2, 3, 4), ValueError, "0-d tensor"),
        (torch.zeros(5, 8), torch.zeros(2, 0, 4), ValueError, "non-empty"),
        (torch.zeros(5, 9), torch.zeros(2, 3, 4), ValueError, r"M·d = 2·4 = 8 .* D = 9"),
        (torch.zeros(5, 8), torch.zeros(2, 3, 4, device="meta"), ValueError, "same device"),
    ],
)
def test_pq_assign_rejects_bad_input(z, cb, exc, match):
    with pytest.raises(exc, match=match):
        F.pq_assign(z, cb)


def test_backend_errors(monkeypatch):
    z, cb = make_inputs((4,), 2, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        F.pq_assign(z, cb, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        F.pq_assign(z, cb, backend="triton")
    # Without Triton: "auto" falls back to the eager path, an explicit "triton" says why not.
    monkeypatch.setattr(F, "_TRITON_IMPORTABLE", [False])
    assert not F.triton_available()
    assert torch.equal(F.pq_assign(z, cb), ref.pq_assign_chunked(z, cb)[0])
    with pytest.raises(RuntimeError, match="'triton' requested but Triton is not installed"):
        F.pq_assign(z, cb, backend="triton")


def test_launch_option_errors_and_reference_ignores_them():
    z, cb = make_inputs((4,), 2, 5, 3, torch.float32)
    match = r"pq_assign: fp32_precision must be one of \('tf32x3', 'ieee'\), got 'tf32'"
    with pytest.raises(ValueError, match=match):
        F.pq_assign(z, cb, fp32_precision="tf32")
    with pytest.raises(TypeError, match="pq_assign: pinned must be a bool, got int"):
        F.pq_assign(z, cb, pinned=1)
    with pytest.raises(TypeError, match="pq_assign: pinned must be a bool, got str"):
        F.pq_quantize(z, cb, pinned="yes")
    codes = F.pq_assign(z, cb)
    assert torch.equal(F.pq_assign(z, cb, fp32_precision="ieee", pinned=True), codes)
    assert torch.equal(F.pq_quantize(z, cb, pinned=True)[1], codes)


def test_lookup_and_statistics_errors():
    cb = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        ref.pq_lookup(torch.zeros(5, 2), cb)
    with pytest.raises(ValueError, match=r"codes must have shape \(\.\.\., M\) with M = 2"):
        ref.pq_lookup(torch.zeros(5, 3, dtype=torch.int64), cb)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, K\) = \[0, 3\)"):
        ref.pq_lookup(torch.full((5, 2), 3), cb)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        ref.pq_lookup(torch.zeros(5, 2, dtype=torch.int64), torch.zeros(3, 4))
    z = torch.zeros(5, 8)
    with pytest.raises(TypeError, match="codes must be int64"):
        F.pq_ema_statistics(z, torch.zeros(5, 2, dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="z must be float32"):
        F.pq_ema_statistics(z.double(), torch.zeros(5, 2, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        F.pq_ema_statistics(z, [0, 1], 3)
    with pytest.raises(ValueError, match="must share leading dims"):
        F.pq_ema_statistics(z, torch.zeros(4, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, K\) = \[0, 3\)"):
        F.pq_ema_statistics(z, torch.full((5, 2), 3), 3)
    with pytest.raises(ValueError, match="num_codes must be a positive int, got 0"):
        F.pq_ema_statistics(z, torch.zeros(5, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="z and codes must be on the same device"):
        F.pq_ema_statistics(z, torch.zeros(5, 2, dtype=torch.int64, device="meta"), 3)
    with pytest.raises(ValueError, match=r"kmeans: x must have shape \(N, M, d\)"):
        ref.kmeans(torch.zeros(0, 2, 3), 4)


def test_triton_rejects_long_subvectors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, cb = make_inputs((2,), 1, 4, 300, torch.float32)
    with pytest.raises(ValueError, match=r"supports sub-vector length d ≤ 256, got d = 300"):
        F.pq_assign(z, cb, backend="triton")


# ---- Triton kernels under the interpreter (one subprocess for every case) --------------------


def _triton_cases():
    """Tiny ragged inputs; each interpreted launch stays far under 1,000 program-tile steps."""
    cases = {}

    def add(name, lead, m, k, d, dtype, cb_dtype=None, seed=0, row_step=1):
        z, cb = make_inputs(lead, m, k, d, dtype, seed)
        if row_step > 1:  # strided rows: the worker and the checks slice z[::row_step]
            z = torch.cat([z, torch.randn_like(z)], 0)
        cases[name] = {"z": z, "cb": cb.to(cb_dtype or dtype), "row_step": row_step}

    add("K300_d12_fp32", (37,), 3, 300, 12, torch.float32)
    add("K300_d12_fp16", (37,), 3, 300, 12, torch.float16, seed=1)
    add("lead3d_fp32", (2, 5, 7), 4, 17, 8, torch.float32, seed=2)
    add("strided_fp16", (33,), 2, 64, 16, torch.float16, seed=3, row_step=2)
    add("N1_M1_K1_d1", (1,), 1, 1, 1, torch.float32)
    add("d3_K33_fp32", (3, 11), 5, 33, 3, torch.float32, seed=4)
    add("bf16_z_fp32_cb", (40,), 2, 70, 8, torch.bfloat16, torch.float32, seed=5)
    add("bf16_upcast_in_interpreter", (40,), 2, 70, 8, torch.bfloat16, seed=6)
    z, cb = clustered_inputs(64, 2, 300, 8)  # plain TF32 would miss the criterion here
    cases["clustered_fp32"] = {"z": z, "cb": cb, "row_step": 1}
    # Long sub-vectors: d sliced into D_CHUNK pieces (fp32 and ieee at d = 40, all at d = 100).
    add("d40_fp32", (21,), 2, 70, 40, torch.float32, seed=8)
    add("d100_fp32", (19,), 1, 40, 100, torch.float32, seed=9)
    add("d100_fp16", (19,), 2, 40, 100, torch.float16, seed=10)
    add("d100_bf16_z_fp32_cb", (19,), 1, 40, 100, torch.bfloat16, torch.float32, seed=12)
    # near ties: codewords 1e-4 apart around a common point
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 1, 8, generator=g) * 10
    cases["near_ties"] = {
        "z": base.reshape(1, 16) + 1e-4 * torch.randn(50, 16, generator=g),
        "cb": base + 1e-4 * torch.randn(2, 130, 8, generator=g),
        "row_step": 1,
    }
    # Exact ties. Small integers make every dot product exact in fp32 whatever the summation
    # order, so equal distances give bitwise-equal scores (with general floats a matmul may round
    # two identical columns differently, and the criterion above is all that can hold).
    cb = torch.randint(-2, 3, (2, 150, 4), generator=g).float()
    cb[0, 10] = cb[0, 3]  # duplicate inside the first K tile (BLOCK_K = 64)
    cb[0, 100] = cb[0, 3]  # and in a later tile
    cb[1, 0] = torch.tensor([9.0, 9.0, 9.0, 9.0])
    cb[1, 1:] = torch.tensor([9.0, 9.0, 9.0, 9.0])  # sub-space 1: all equal -> code 0
    z = torch.cat([cb[0, 3], torch.zeros(4)]).repeat(3, 1)
    cases["tie_across_tiles"] = {"z": z, "cb": cb, "row_step": 1}
    cases["empty"] = {"z": torch.empty(0, 8), "cb": torch.randn(2, 5, 4), "row_step": 1}
    return cases


def _precisions(case) -> tuple[str, ...]:
    """fp32_precision values that change the kernel for this case: both when its dot is fp32
    (fp32 or mixed operands, or bf16 upcast by the interpreter), else only the default."""
    fp32_dot = case["z"].dtype != case["cb"].dtype or case["z"].dtype != torch.float16
    return F.FP32_PRECISIONS if fp32_dot else ("tf32x3",)


def _split_probe_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, generator=g) * torch.logspace(-20, 20, 200)
    special = [0.0, -0.0, 1.0, -1.0, 1.0 + 2**-11, 1.0 + 2**-11 + 2**-23, -(1.0 + 2**-12), 3e38]
    return torch.cat([x, torch.tensor(special)]).float()


def _run_triton_worker(inp: str, out: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, case in torch.load(inp).items():
        z = case["z"][:: case["row_step"]]
        cb = case["cb"]
        for precision in _precisions(case):
            kw = dict(backend="triton", fp32_precision=precision)
            codes, dists = F.pq_assign(z, cb, return_distances=True, **kw)
            codes_only = F.pq_assign(z, cb, **kw)  # WITH_DIST=False variant
            assert torch.equal(codes_only, codes), name
            results[f"{name}/{precision}"] = {"codes": codes, "dists": dists}
        counts, sums = F.pq_ema_statistics(z, codes, cb.shape[1], backend="triton")
        results[f"{name}/stats"] = {"counts": counts, "sums": sums}
    from pq_split_probe import split_tf32

    results["split"] = dict(zip(("hi", "lo"), split_tf32(_split_probe_values())))
    # torch.compile traces the custom op (Triton backend) as one node
    case = torch.load(inp)["K300_d12_fp32"]

    def f(z, cb):
        return F.pq_assign(z + 0.0, cb, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    results["compiled"] = {"codes": compiled(case["z"], case["cb"])}
    torch.save(results, out)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    cases = _triton_cases()
    work = tmp_path_factory.mktemp("pq_triton")
    inp, out = str(work / "cases.pt"), str(work / "results.pt")
    torch.save(cases, inp)
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, __file__, WORKER_FLAG, inp, out],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return cases, torch.load(out)


TRITON_CASES = [
    f"{name}/{precision}"
    for name, case in _triton_cases().items()
    for precision in _precisions(case)
]


@pytest.mark.parametrize("key", TRITON_CASES)
def test_triton_kernel_interpreted(triton_results, key):
    cases, results = triton_results
    name = key.split("/")[0]
    case, res = cases[name], results[key]
    z = case["z"][:: case["row_step"]]
    cb = case["cb"]
    m, k, _ = cb.shape
    assert res["codes"].shape == (*z.shape[:-1], m)
    assert_argmin_criterion(z, cb, res["codes"], res["dists"])
    exp_codes, exp_d = ref.pq_assign_chunked(z, cb)
    torch.testing.assert_close(res["dists"], exp_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(_triton_cases()))
def test_triton_ema_statistics_interpreted(triton_results, name):
    cases, results = triton_results
    case, res = cases[name], results[f"{name}/stats"]
    z = case["z"][:: case["row_step"]]
    k = case["cb"].shape[1]
    # The statistics of the codes the kernel chose (its last precision's).
    codes = results[f"{name}/{_precisions(case)[-1]}"]["codes"]
    counts, sums = ref.pq_ema_statistics(z, codes, k)
    assert torch.equal(res["counts"], counts)
    torch.testing.assert_close(res["sums"], sums, rtol=1e-5, atol=1e-5)


def test_tf32_split_is_exact_to_22_bits(triton_results):
    """hi and lo are TF32 values (low 13 mantissa bits clear), hi is x rounded to nearest TF32,
    and x - hi - lo is within 2^-22 |x|: what makes the three TF32 products ~fp32-accurate."""
    _, results = triton_results
    x = _split_probe_values().double()
    hi, lo = results["split"]["hi"], results["split"]["lo"]
    for part in (hi, lo):
        assert torch.all(part.view(torch.int32) & 0x1FFF == 0)
    hi64, lo64 = hi.double(), lo.double()
    assert torch.all((x - hi64).abs() <= 2.0**-11 * x.abs())
    assert torch.all((x - hi64 - lo64).abs() <= 2.0**-22 * x.abs())
    assert hi64[x == 1.0 + 2**-11].tolist() == [1.0 + 2**-10]  # a tie rounds away from zero
    assert lo64[x == 0].tolist() == [0.0, 0.0]


def test_triton_tie_across_tiles_takes_lowest_index(triton_results):
    _, results = triton_results
    for precision in F.FP32_PRECISIONS:
        assert results[f"tie_across_tiles/{precision}"]["codes"].tolist() == [[3, 0]] * 3


def test_triton_custom_op_compiles_fullgraph(triton_results):
    cases, results = triton_results
    case = cases["K300_d12_fp32"]
    assert torch.equal(
        results["compiled"]["codes"], ref.pq_assign_chunked(case["z"], case["cb"])[0]
    )


# ---- GPU code paths, checked without a GPU ---------------------------------------------------
# (The prune per device class and the launcher's autotune key are tested in test_launch.py.)

_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (z dtype, codebook dtype, fp32_precision, d): the shared-memory and register extremes.
AOT_CASES = {
    "fp32-tf32x3-d32": (torch.float32, torch.float32, "tf32x3", 32),
    "fp32-tf32x3-d256": (torch.float32, torch.float32, "tf32x3", 256),
    "fp32-ieee-d64": (torch.float32, torch.float32, "ieee", 64),
    "bf16-d16": (torch.bfloat16, torch.bfloat16, "tf32x3", 16),
    "bf16-d64": (torch.bfloat16, torch.bfloat16, "tf32x3", 64),
    "mixed-tf32x3-d128": (torch.bfloat16, torch.float32, "tf32x3", 128),
}
AOT_GRID = [
    *((cls, case) for cls in ("sm_80", "sm_90") for case in AOT_CASES),
    *((cls, case) for cls in ("sm_86", "sm_89") for case in ("fp32-tf32x3-d32", "bf16-d64")),
]


def _compile_assign(pa, z_dtype, cb_dtype, dot, d, config, arch):
    import aot

    fn = pa._pq_assign_kernel
    pointers = {"z_ptr": _NAMES[z_dtype], "cb_ptr": _NAMES[cb_dtype]}
    pointers.update(codes_ptr="i64", dist_ptr="fp32")
    block_d = max(16, 1 << (d - 1).bit_length())
    constexprs = dict(K=300, D_SUB=d, BLOCK_D=block_d, D_CHUNK=pa.d_chunk(dot, block_d))
    constexprs.update(UPCAST=z_dtype != cb_dtype, DOT=dot, WITH_DIST=True, stride_zd=1)
    constexprs.update(config.kwargs)
    signature, attrs = aot.plain_signature(fn, pointers, constexprs)
    return aot.compile_kernel(fn, signature, constexprs, attrs, config, arch)


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "case"), AOT_GRID)
def test_kept_tilings_compile_fit_and_do_not_spill(monkeypatch, cls, case):
    """For each device class the tilings the prune keeps with the most shared memory and with
    the most registers go through Triton's CUDA pipeline to a cubin (ptxas, no GPU): shared
    memory within the class's limit and within the estimate, and no register spills."""
    import aot

    from pqmim_kernels.ops import _launch
    from pqmim_kernels.ops import pq_assign as pa

    limits = _launch.DEVICE_CLASSES[cls]
    arch = 10 * limits.capability[0] + limits.capability[1]
    aot.require_toolchain(arch)
    z_dtype, cb_dtype, precision, d = AOT_CASES[case]
    upcast = z_dtype != cb_dtype
    dot = precision if upcast or z_dtype == torch.float32 else "f16"
    block_d = max(16, 1 << (d - 1).bit_length())
    elem = pa._operand_bytes(upcast, dot, z_dtype)
    monkeypatch.setattr(pa, "device_limits", lambda _: limits)
    args = {"z_ptr": torch.empty(0, dtype=z_dtype), "UPCAST": upcast, "DOT": dot}
    kept = pa._prune_configs(pa._configs(), {**args, "BLOCK_D": block_d})

    def cost(c):
        return pa.config_cost(c, block_d, elem, dot)

    picks = {max(kept, key=lambda c: cost(c)[0]), max(kept, key=lambda c: cost(c)[1])}
    for config in picks:
        used = aot.resources(_compile_assign(pa, z_dtype, cb_dtype, dot, d, config, arch))
        assert used["shared"] <= limits.smem_per_block, (config, used)
        assert used["shared"] <= cost(config)[0], (config, used, cost(config))
        if used["stack"] is not None:
            assert used["stack"] <= 128, (config, used)  # a few words, not a spill loop


@pytest.mark.parametrize(
    ("z_dtype", "d", "arch"), [(torch.bfloat16, 12, 90), (torch.float32, 1, 80)]
)
@pytest.mark.slow
def test_stats_kernel_compiles_ahead_of_time(z_dtype, d, arch):
    import aot
    import triton

    from pqmim_kernels.ops import pq_stats as ps

    aot.require_toolchain(arch)
    fn = ps._pq_stats_kernel
    pointers = {"z_ptr": _NAMES[z_dtype], "codes_ptr": "i64"}
    pointers.update(counts_ptr="fp32", sums_ptr="fp32")
    config = triton.Config({}, num_warps=4, num_stages=1)
    constexprs = dict(K=300, D_SUB=d, BLOCK_N=64, BLOCK_D=triton.next_power_of_2(d), stride_zd=1)
    signature, attrs = aot.plain_signature(fn, pointers, constexprs)
    compiled = aot.compile_kernel(fn, signature, constexprs, attrs, config, arch)
    assert compiled.asm["cubin"], "ptxas produced no cubin"


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _run_triton_worker(*sys.argv[sys.argv.index(WORKER_FLAG) + 1 :][:2])
