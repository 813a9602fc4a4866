"""PQ-MIM model parts: coding schedule, config, MIM entropy model, forward, save/load."""

import dataclasses

import numpy as np
import pytest
import torch
from _tiny import TINY

from pqmim_kernels.models import PQMIM, PQMIMConfig, load_model, save_model
from pqmim_kernels.models import schedule as sch
from pqmim_kernels.models.mim import MIMEntropyModel, mim_bits, stage_grid


def tiny_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    return PQMIM(config).eval()


# ---- coding schedule ----


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (3, 2), (16, 16), (32, 48), (13, 29)])
def test_coding_order_is_a_fixed_permutation(h, w):
    order = sch.coding_order(h, w)
    assert order.dtype == np.int64 and order.shape == (h * w,)
    assert np.array_equal(np.sort(order), np.arange(h * w))
    assert np.array_equal(order, sch.coding_order(h, w))
    with pytest.raises(ValueError, match="read-only"):
        order[0] = 0


def test_coding_order_known_values():
    # Pinned: the order is part of the bitstream format (docs/PQM_FORMAT.md); a change here
    # makes every existing .pqm file undecodable.
    assert [int(v) for v in sch.mix32(np.array([0, 1, 2, 12345]))] == [
        0,
        1753845952,
        3507691905,
        2435775735,
    ]
    assert sch.coding_order(4, 4).tolist() == [0, 2, 8, 10, 14, 4, 1, 15, 12, 11, 13, 6, 3, 9, 5, 7]
    assert sch.coding_order(3, 5).tolist() == [0, 4, 14, 12, 10, 2, 3, 5, 9, 6, 1, 8, 13, 11, 7]


def test_coding_order_is_coarse_to_fine_and_spread():
    h, w = 32, 48
    order = sch.coding_order(h, w)
    ys, xs = np.divmod(order, w)
    # the first 24 tokens are exactly the 8-spaced lattice (level >= 3): spread over the grid
    first = set(zip(ys[:24].tolist(), xs[:24].tolist(), strict=True))
    assert first == {(y, x) for y in range(0, 32, 8) for x in range(0, 48, 8)}
    # within the first stage, tokens touch every quadrant
    cum = sch.stage_bounds(h * w, 10)
    s0 = order[: cum[1]]
    qy, qx = np.divmod(s0, w)
    quads = {(int(y >= h // 2), int(x >= w // 2)) for y, x in zip(qy, qx, strict=True)}
    assert quads == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_coding_order_depends_on_grid_size_only():
    a = sch.coding_order(20, 30)
    b = sch.coding_order(20, 31)
    assert not np.array_equal(np.divmod(a[:100], 30), np.divmod(b[:100], 31))


@pytest.mark.parametrize("n,stages", [(1, 10), (6, 10), (96, 10), (1536, 10), (1000, 8)])
def test_stage_bounds(n, stages):
    cum = sch.stage_bounds(n, stages)
    assert cum[0] == 0 and cum[-1] == n and len(cum) == stages + 1
    counts = np.diff(cum)
    assert (counts >= 0).all()
    if n >= stages * stages:  # increasing schedule once rounding no longer dominates
        assert (np.diff(counts) >= 0).all() and counts[-1] > counts[0]
    st = sch.stage_of_position(1, n, stages)
    assert np.bincount(st, minlength=stages).tolist() == counts.tolist()


def test_schedule_errors():
    with pytest.raises(ValueError, match="h must be a positive int"):
        sch.coding_order(0, 3)
    with pytest.raises(ValueError, match="w must be a positive int"):
        sch.coding_order(3, 2.5)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        sch.stage_bounds(0)
    with pytest.raises(ValueError, match="stages must be a positive int"):
        sch.stage_bounds(10, 0)


# ---- config ----


def test_config_validation_and_json():
    cfg = PQMIMConfig()
    assert cfg.raw_bpp == pytest.approx(8 * 8 / 256)
    again = PQMIMConfig.from_dict(dataclasses.asdict(cfg))
    assert again == cfg
    with pytest.raises(ValueError, match="latent_dim 10 is not a multiple of num_subspaces 4"):
        PQMIMConfig(latent_dim=10, num_subspaces=4)
    with pytest.raises(ValueError, match="channels must be 4 positive ints"):
        PQMIMConfig(channels=(8, 8, 8))
    with pytest.raises(ValueError, match=r"codebook_size must be in \[2, 65536\]"):
        PQMIMConfig(codebook_size=1)
    with pytest.raises(ValueError, match=r"stages must be in \[1, 16\]"):
        PQMIMConfig(stages=17)
    with pytest.raises(ValueError, match="unknown fields"):
        PQMIMConfig.from_dict({"bogus": 1})


# ---- MIM entropy model ----


def _changed(a, b):
    return (a - b).abs().amax(dim=(-1,)) > 1e-6  # (B, n, M) bool


def test_logits_depend_only_on_earlier_stages_and_earlier_sub_codes():
    """What the coder relies on: token i's sub-code m is predicted from tokens of earlier stages
    and sub-codes < m of token i, nothing else (teacher forcing equals coding)."""
    torch.manual_seed(0)
    em = MIMEntropyModel(3, 16, width=16, depth=2, heads=2, radius=2).eval()
    h, w = 5, 6
    st = stage_grid(h, w, 4)
    codes = torch.randint(0, 16, (1, h, w, 3))
    with torch.no_grad():
        out = em(codes, st)
        assert out.shape == (1, h * w, 3, 16)
        j = int((st == 1).nonzero()[0])
        codes2 = codes.clone().view(1, h * w, 3)
        codes2[0, j] = (codes2[0, j] + 5) % 16
        diff = _changed(em(codes2.view(1, h, w, 3), st), out)[0]  # (n, M)
    later = st > st[j]
    others = torch.arange(h * w) != j
    assert not bool(diff[(~later) & others].any())  # same or earlier stages: untouched
    assert bool(diff[later].any())  # some later token sees it
    assert not bool(diff[j, 0]) and bool(diff[j, 1:].all())  # sub-code 0 never sees its token


def test_forward_errors():
    em = MIMEntropyModel(2, 16, width=16, depth=1, heads=2, radius=1)
    with pytest.raises(ValueError, match="codes must have M=2 sub-codes, got 3"):
        em(torch.zeros(1, 2, 2, 3, dtype=torch.long), stage_grid(2, 2, 3))
    with pytest.raises(ValueError, match=r"stages must be \(4,\), got \(5,\)"):
        em(torch.zeros(1, 2, 2, 2, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_mim_bits_is_differentiable_and_near_uniform_at_init():
    torch.manual_seed(0)
    em = MIMEntropyModel(2, 16, width=16, depth=1, heads=2, radius=2)
    codes = torch.randint(0, 16, (3, 4, 5, 2))
    bits = mim_bits(em, codes, 6)
    assert bits.shape == (3,)
    # ~uniform predictions at init: about log2(16) bits per sub-code, 2 per token
    assert torch.allclose(bits / 20, torch.full((3,), 8.0), rtol=0.1)
    bits.sum().backward()
    grad = em.out.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert em.blocks[0].bias.grad is not None  # the offset bias is learned


# ---- the PQMIM module ----


def test_forward_contract_shapes():
    model = tiny_model().train()
    x = torch.rand(2, 3, 40, 23)
    out = model(x)
    assert out["x_hat"].shape == (2, 3, 40, 23)
    assert out["codes"].shape == (2, 3, 2, 2) and out["codes"].dtype == torch.int64
    assert out["bits"].shape == (2,) and out["bpp"].shape == (2,)
    assert torch.allclose(out["bpp"], out["bits"] / (40 * 23))
    loss = torch.nn.functional.mse_loss(out["x_hat"], x) + out["vq_loss"] + out["bits"].mean()
    loss.backward()
    assert model.encoder.net[0].weight.grad is not None


def test_forward_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model(np.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        model(torch.zeros(1, 4, 16, 16))
    with pytest.raises(TypeError, match="x must be a float tensor"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_save_load_round_trip(tmp_path):
    model = tiny_model(3)
    path = tmp_path / "m.pt"
    save_model(model, path)
    a = load_model(str(path))
    b = load_model(str(path))
    assert not a.training
    assert a.config == model.config
    assert a.model_id() == b.model_id() and len(a.model_id()) == 2
    x = torch.rand(1, 3, 33, 20)
    assert torch.equal(a.encode_codes(x), b.encode_codes(x))
    # fp16 storage: weights within half precision of the original
    w0, w1 = model.decoder.net[-1].weight, a.decoder.net[-1].weight
    assert torch.allclose(w0, w1, rtol=1e-3, atol=1e-4)
    full = tmp_path / "full.pt"
    save_model(model, full, half=False)
    assert load_model(str(full)).model_id() == model.model_id()


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_model: no model file at"):
        load_model(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a PQ-MIM model file"):
        load_model(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"kind": "something-else"}, other)
    with pytest.raises(ValueError, match="is not a PQ-MIM model file"):
        load_model(str(other))
    with pytest.raises(TypeError, match="load_model: expected a name or path, got int"):
        load_model(3)
