"""Masked attention on a real GPU at GPU-sized shapes (skipped without CUDA).

``test_masked_attention_triton.py`` covers the semantics on small ragged shapes (it runs on
CUDA too, pinned); here: multi-block shapes with the GPU tilings, every mask form in fp16 and
bf16 forward and backward, the autotuned path and its prune on the actual device (fp32 at
Dh = 256 included), and pinned launches (bitwise repeatable). ``bench/gpu_suite.py`` runs this
file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))

from masked_attention_cases import MASK_FORMS, check_ratio, make_case, oracle_and_yardstick  # noqa: E402

from pqmim_kernels.functional import masked_attention  # noqa: E402

DEV = "cuda"


def _run(q, k, v, do, masks, pinned):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*ins, backend="triton", pinned=pinned, **masks)
    return (out.detach(), *torch.autograd.grad(out, ins, do))


def _check(name, got, q, k, v, do, masks, dtype):
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for part, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        assert a.dtype == dtype and a.device.type == "cuda"
        check_ratio(f"{name}/{part}", a, o, y, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", MASK_FORMS)
def test_every_mask_form_pinned_gpu_sized(form, dtype):
    q, k, v, do, masks = make_case(2, 3, 300, 333, 64, form, dtype, seed=31, device=DEV)
    got = _run(q, k, v, do, masks, pinned=True)
    _check(f"{form}/{dtype}", got, q, k, v, do, masks, dtype)
    again = _run(q, k, v, do, masks, pinned=True)
    for a, b in zip(got, again):
        assert torch.equal(a, b), "pinned launches must repeat bitwise"


@pytest.mark.parametrize(
    ("dtype", "dh", "form"),
    [
        (torch.float16, 64, "key_lengths"),
        (torch.bfloat16, 128, "combined"),
        (torch.float16, 128, "attn_float"),
        (torch.float32, 64, "key_mask"),
        (torch.float32, 256, "none"),
        (torch.bfloat16, 256, "key_lengths"),
    ],
    ids=str,
)
def test_autotuned_gpu_sized(dtype, dh, form):
    q, k, v, do, masks = make_case(2, 2, 257, 300, dh, form, dtype, seed=32, device=DEV)
    got = _run(q, k, v, do, masks, pinned=False)
    _check(f"{form}/{dtype}/{dh}", got, q, k, v, do, masks, dtype)


@pytest.mark.parametrize("dh", [16, 24, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pinned_head_dims(dtype, dh):
    q, k, v, do, masks = make_case(1, 2, 130, 150, dh, "key_lengths", dtype, seed=dh, device=DEV)
    got = _run(q, k, v, do, masks, pinned=True)
    _check(f"dh={dh}/{dtype}", got, q, k, v, do, masks, dtype)


def test_long_sequence_known_first_skips_hidden_keys():
    """L = 4096 with 10 % of the keys known: NaN planted in every hidden key and value must not
    reach the result (the kernel never loads key blocks past the length)."""
    q, k, v, do, _ = make_case(1, 4, 4096, 4096, 64, "none", torch.float16, seed=33, device=DEV)
    lengths = torch.tensor([410], device=DEV)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 512:] = float("nan")
    v2[:, :, 512:] = float("nan")
    for pinned in (True, False):
        clean = _run(q, k, v, do, {"key_lengths": lengths}, pinned)
        dirty = _run(q, k2, v2, do, {"key_lengths": lengths}, pinned)
        for a, b in zip(dirty[:2], clean[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
