"""nn.ProductQuantizer: conventions, EMA learning, k-means init, dead codes, DDP sync, drop-in."""

from __future__ import annotations

import pytest
import torch

from pqmim_kernels.nn import ProductQuantizer


def mixture(n, centers, noise, generator):
    """n samples (n, M·d) whose sub-vector m is drawn around a random row of centers[m]."""
    m, k, d = centers.shape
    pick = torch.randint(0, k, (n, m), generator=generator)
    sub = centers[torch.arange(m), pick]  # (n, M, d)
    return (sub + noise * torch.randn(n, m, d, generator=generator)).reshape(n, m * d)


def nearest_error(codebooks, centers):
    """Max over true centers of the distance to the closest learned codeword (per sub-space)."""
    dist = torch.cdist(centers, codebooks)  # (M, K_true, K)
    return float(dist.min(-1).values.max())


# ---- conventions ------------------------------------------------------------------------------


def test_call_convention_channel_last():
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16)
    x = torch.randn(2, 50, 32, requires_grad=True)
    quantized, indices, loss = pq(x)
    assert quantized.shape == x.shape and quantized.dtype == x.dtype
    assert indices.shape == (2, 50, 4) and indices.dtype == torch.int64
    assert loss.shape == () and loss.requires_grad
    assert pq.codebooks.shape == (4, 16, 8) and pq.codebook is pq.codebooks
    assert torch.equal(pq.get_output_from_indices(indices), quantized.detach())
    torch.testing.assert_close(loss, 0.25 * ((x - quantized) ** 2).mean())
    # 2-D input (B, D), as vector-quantize-pytorch accepts
    q2, i2, _ = pq(torch.randn(5, 32))
    assert q2.shape == (5, 32) and i2.shape == (5, 4)


def test_image_feature_maps_and_channel_first():
    torch.manual_seed(0)
    pq = ProductQuantizer(12, 3, 8, accept_image_fmap=True)
    x = torch.randn(2, 12, 5, 6)
    quantized, indices, _ = pq(x)
    assert quantized.shape == (2, 12, 5, 6) and indices.shape == (2, 5, 6, 3)
    assert torch.equal(pq.get_output_from_indices(indices), quantized)
    # same codes as the channel-last view of the same tokens
    pq.eval()
    tokens = x.permute(0, 2, 3, 1)
    flat = ProductQuantizer(12, 3, 8).eval()
    flat.load_state_dict(pq.state_dict())
    assert torch.equal(pq(x)[1], flat(tokens)[1])

    pq_cf = ProductQuantizer(12, 3, 8, channel_last=False)
    q, i, _ = pq_cf(torch.randn(2, 12, 7))
    assert q.shape == (2, 12, 7) and i.shape == (2, 7, 3)
    assert torch.equal(pq_cf.get_output_from_indices(i), q)


def test_straight_through_gradient_and_commitment_gradient():
    torch.manual_seed(0)
    pq = ProductQuantizer(16, 2, 8, commitment_weight=0.5)
    x = torch.randn(3, 10, 16, requires_grad=True)
    quantized, _, loss = pq(x)
    upstream = torch.randn_like(quantized)
    quantized.backward(upstream, retain_graph=True)
    assert torch.equal(x.grad, upstream)
    x.grad = None
    loss.backward()
    torch.testing.assert_close(x.grad, 0.5 * 2 * (x - quantized.detach()) / x.numel())


def test_eval_mode_freezes_codebooks():
    torch.manual_seed(0)
    pq = ProductQuantizer(16, 2, 8, kmeans_init=True).eval()
    state = {k: v.clone() for k, v in pq.state_dict().items()}
    for _ in range(3):
        pq(torch.randn(4, 20, 16) + 5)
    for k, v in pq.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not bool(pq.initted)  # no k-means in eval mode either
    stats = pq.codebook_stats()
    assert set(stats) == {"perplexity", "usage", "ema_perplexity", "dead_fraction"}
    assert all(v.shape == (2,) for v in stats.values())


def test_codebook_stats_values():
    # M = 2 sub-spaces of d = 1 with codewords 0, 10, 20, 30: sub-space 0 of the batch uses
    # codes 0 and 1 equally, sub-space 1 only code 3.
    pq = ProductQuantizer(2, 2, 4, kmeans_init=False, threshold_ema_dead_code=2.0).eval()
    with torch.no_grad():
        pq.embed.copy_(torch.tensor([0.0, 10.0, 20.0, 30.0]).expand(2, 4).unsqueeze(-1))
        pq.cluster_size.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 5.0, 5.0]]))
    x = torch.tensor([[0.1, 29.0], [9.8, 31.0], [0.3, 30.2], [10.4, 28.5]])
    _, indices, _ = pq(x)
    assert indices.tolist() == [[0, 3], [1, 3], [0, 3], [1, 3]]
    stats = pq.codebook_stats()
    torch.testing.assert_close(stats["perplexity"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(stats["usage"], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(stats["ema_perplexity"], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(stats["dead_fraction"], torch.tensor([1.0, 0.5]))


# ---- codebook learning ------------------------------------------------------------------------


def test_kmeans_init_on_first_batch_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, 4, generator=g) * 4
    pq = ProductQuantizer(12, 3, 8, kmeans_iters=20, threshold_ema_dead_code=0)
    x = mixture(2000, centers, 0.05, g)
    torch.manual_seed(0)
    pq(x)
    assert bool(pq.initted)
    # k-means++ seeding + Lloyd recovers every well-separated center
    assert nearest_error(pq.codebooks, centers) < 0.1


def test_ema_converges_on_a_toy_mixture():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 6, 3, generator=g) * 3
    pq = ProductQuantizer(6, 2, 6, decay=0.9, kmeans_init=False, threshold_ema_dead_code=0)
    with torch.no_grad():  # start each codeword off its center by a visible offset
        pq.embed.copy_(centers + 0.5 * torch.randn(2, 6, 3, generator=g))
        pq.embed_avg.copy_(pq.embed)
    start = nearest_error(pq.codebooks, centers)
    for _ in range(150):
        pq(mixture(512, centers, 0.1, g))
    end = nearest_error(pq.codebooks, centers)
    assert start > 0.4 and end < 0.05, (start, end)
    ppl = pq.codebook_stats()["perplexity"]
    assert torch.all(ppl > 5.0)  # all six modes in use


def test_dead_codes_are_reseeded_from_current_batch():
    torch.manual_seed(0)
    pq = ProductQuantizer(4, 2, 8, kmeans_init=False, threshold_ema_dead_code=1.0, decay=0.5)
    with torch.no_grad():
        pq.embed.fill_(100.0)  # every code far away ...
        pq.embed[:, 0] = 0.0  # ... except code 0, which takes the whole batch
        pq.embed_avg.copy_(pq.embed)
    x = torch.randn(64, 4)
    _, indices, _ = pq(x)
    assert torch.all(indices == 0)
    # codes 1..7 got no assignment: EMA count 0.5 < 1 -> re-seeded from batch sub-vectors
    sub = x.reshape(64, 2, 2)
    for m in range(2):
        for k in range(1, 8):
            match = (sub[:, m] - pq.embed[m, k]).abs().sum(-1).min()
            assert match == 0, (m, k)
        assert torch.all(pq.cluster_size[m, 1:] == 1.0)
    # and the next batch uses them
    _, indices, _ = pq(torch.randn(256, 4))
    assert indices.unique().numel() > 4


def test_distributed_statistics_are_all_reduced(monkeypatch):
    """Fake a 2-rank group whose ranks see the same batch: the update must equal a single
    process seeing the batch twice."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    kw = dict(kmeans_init=False, threshold_ema_dead_code=0, decay=0.8)
    single = ProductQuantizer(8, 2, 4, **kw)
    ddp = ProductQuantizer(8, 2, 4, **kw)
    ddp.load_state_dict(single.state_dict())
    calls = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def all_reduce(t, *a, **k):
        calls.append("all_reduce")
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", lambda t, src, *a, **k: calls.append("broadcast"))
    ddp(x)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    single(torch.cat([x, x]))
    assert calls == ["all_reduce", "all_reduce"]
    for name in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(ddp, name), getattr(single, name))


def test_state_dict_round_trip_keeps_initialisation():
    torch.manual_seed(0)
    pq = ProductQuantizer(8, 2, 4)
    pq(torch.randn(30, 8))
    fresh = ProductQuantizer(8, 2, 4)
    fresh.load_state_dict(pq.state_dict())
    assert bool(fresh.initted) and torch.equal(fresh.codebooks, pq.codebooks)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((32.0, 4, 16), {}, TypeError, "dim must be an int"),
        ((32, 0, 16), {}, ValueError, "num_subspaces must be ≥ 1"),
        ((30, 4, 16), {}, ValueError, "dim = 30 must be divisible by num_subspaces = 4"),
        ((32, 4, 16), {"decay": 1.0}, ValueError, r"decay must lie in \(0, 1\)"),
        ((32, 4, 16), {"eps": 0.0}, ValueError, "eps must be > 0"),
        ((32, 4, 16), {"commitment_weight": -1}, ValueError, "commitment_weight must be ≥ 0"),
        ((32, 4, 16), {"threshold_ema_dead_code": -1}, ValueError, "threshold_ema_dead_code"),
        (
            (32, 4, 16),
            {"accept_image_fmap": True, "channel_last": False},
            ValueError,
            "leave channel_last=True",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ProductQuantizer(*args, **kwargs)


def test_forward_rejects_bad_input():
    pq = ProductQuantizer(8, 2, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pq([1.0] * 8)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 8\) input"):
        pq(torch.randn(3, 7))
    img = ProductQuantizer(8, 2, 4, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"expected image feature maps \(B, 8, H, W\)"):
        img(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"image feature maps need indices \(B, H, W, M\)"):
        img.get_output_from_indices(torch.zeros(2, 5, 2, dtype=torch.int64))
    cf = ProductQuantizer(8, 2, 4, channel_last=False)
    with pytest.raises(ValueError, match=r"channel_last=False expects \(B, 8, N\)"):
        cf(torch.randn(2, 5, 8))
    with pytest.raises(RuntimeError, match="sync_distributed=True but torch.distributed"):
        ProductQuantizer(8, 2, 4, sync_distributed=True)(torch.randn(3, 8))


# ---- drop-in for vector-quantize-pytorch --------------------------------------------------------


def _manifold_tokens(n, g):
    """(n, 4, 16) tokens on a curved 2-D manifold in R^16, plus a little noise."""
    t = torch.rand(n, 4, 2, generator=g) * 6 - 3
    basis = torch.linspace(0, 1, 16)
    x = torch.sin(t[..., :1] * (1 + 3 * basis)) + torch.cos(t[..., 1:] * (2 - basis))
    return x + 0.01 * torch.randn(x.shape, generator=g)


def _train_tiny_autoencoder(quantizer, steps):
    """The same training loop for any quantizer with the VectorQuantize call convention."""
    from torch import nn

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    dec = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = _manifold_tokens(256, g)
        quantized, indices, loss = quantizer(enc(x))
        total = torch.nn.functional.mse_loss(dec(quantized), x) + loss
        opt.zero_grad()
        total.backward()
        opt.step()
    quantizer.eval()
    with torch.no_grad():
        x = _manifold_tokens(4096, torch.Generator().manual_seed(123))
        quantized, indices, loss = quantizer(enc(x))
        mse = torch.nn.functional.mse_loss(dec(quantized), x).item()
        usage = [indices[..., m].unique().numel() / 16 for m in range(indices.shape[-1])]
        assert torch.equal(quantizer.get_output_from_indices(indices), quantized)
    return mse, usage, quantized.shape, indices.shape, loss.shape


def test_drop_in_for_vector_quantize_pytorch_trains_at_least_as_well():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    common = dict(decay=0.99, commitment_weight=0.25, kmeans_init=True, threshold_ema_dead_code=2)
    ours = ProductQuantizer(8, 2, 16, **common)
    theirs = vqp.VectorQuantize(
        8, 16, heads=2, separate_codebook_per_head=True, codebook_dim=4, **common
    )
    assert ours.codebooks.shape == theirs.codebook.shape == (2, 16, 4)
    mse_ours, use_ours, *shapes_ours = _train_tiny_autoencoder(ours, steps=120)
    mse_theirs, use_theirs, *shapes_theirs = _train_tiny_autoencoder(theirs, steps=120)
    assert shapes_ours == shapes_theirs  # same return convention: (4096, 4, 8), (4096, 4, 2)
    assert mse_ours <= mse_theirs, (mse_ours, mse_theirs)
    assert min(use_ours) >= min(use_theirs), (use_ours, use_theirs)


# ---- VectorQuantize's constructor and call conventions ------------------------------------------


def test_two_constructor_forms_and_their_defaults():
    ours = ProductQuantizer(32, 4, 16)
    assert (ours.num_subspaces, ours.codebook_size, ours.subspace_dim) == (4, 16, 8)
    assert (ours.decay, ours.commitment_weight, ours.kmeans_init) == (0.99, 0.25, True)
    assert (ours.threshold_ema_dead_code, ours.rotation_trick) == (2.0, False)
    assert ProductQuantizer(dim=32, num_subspaces=4, codebook_size=16).decay == 0.99
    for vq in (
        ProductQuantizer(32, 16, heads=4, separate_codebook_per_head=True, codebook_dim=8),
        ProductQuantizer(dim=32, codebook_size=16, heads=4, separate_codebook_per_head=True),
    ):
        assert (vq.num_subspaces, vq.heads, vq.codebook_size, vq.codebook_dim) == (4, 4, 16, 8)
        # every default is VectorQuantize's
        assert (vq.decay, vq.commitment_weight, vq.kmeans_init) == (0.8, 1.0, False)
        assert (vq.threshold_ema_dead_code, vq.rotation_trick) == (0.0, True)
        assert bool(vq.initted)
    one = ProductQuantizer(32, 16)  # VectorQuantize(dim, codebook_size): one head, d = D
    assert (one.num_subspaces, one.subspace_dim) == (1, 32)
    keys = {"embed", "cluster_size", "embed_avg", "initted"}
    assert set(ours.state_dict()) == set(one.state_dict()) == keys


def test_bundled_model_quantizer_state_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pqmim_kernels" / "data" / "default_model.pt"
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = blob["config"]
    state = {
        k.removeprefix("quantizer."): v.float() if v.is_floating_point() else v
        for k, v in blob["state_dict"].items()
        if k.startswith("quantizer.")
    }
    pq = ProductQuantizer(cfg["latent_dim"], cfg["num_subspaces"], cfg["codebook_size"])
    pq.load_state_dict(state)  # strict: same keys and shapes
    assert bool(pq.initted)


def _vq_pairs():
    """(kwargs, input) pairs run through both VectorQuantize and ProductQuantizer."""

    def heads(h, **kw):  # VectorQuantize needs codebook_dim = dim / heads to skip projections
        return dict(dim=16, codebook_size=8, heads=h, separate_codebook_per_head=True,
                    codebook_dim=16 // h, **kw)  # fmt: skip

    return [
        (dict(dim=16, codebook_size=8), torch.randn(2, 10, 16)),
        (dict(dim=16, codebook_size=8), torch.randn(5, 16)),
        (heads(4), torch.randn(2, 10, 16)),
        (heads(2), torch.randn(5, 16)),
        (dict(dim=16, codebook_size=8, accept_image_fmap=True), torch.randn(2, 16, 3, 5)),
        (heads(4, accept_image_fmap=True), torch.randn(2, 16, 3, 5)),
        (dict(dim=16, codebook_size=8, channel_last=False), torch.randn(2, 16, 7)),
        (heads(2, channel_last=False), torch.randn(2, 16, 7)),
    ]


@pytest.mark.parametrize("case", range(len(_vq_pairs())))
def test_same_return_convention_as_vector_quantize(case):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kwargs, x = _vq_pairs()[case]
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(**kwargs)
    ours = ProductQuantizer(**kwargs)
    if ours.heads > 1:
        assert ours.codebook.shape == theirs.codebook.shape
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        q1, i1, l1 = theirs(x)
        q2, i2, l2 = ours(x)
        assert q2.shape == q1.shape and i2.shape == i1.shape and i2.dtype == i1.dtype
        assert l2.shape == l1.shape == ()
        assert ours.get_output_from_indices(i2).shape == theirs.get_output_from_indices(i1).shape
        assert torch.equal(ours.get_codes_from_indices(i2), q2.detach())


@pytest.mark.filterwarnings("ignore:Using a target size")  # theirs, multi-head masks
def test_masks_and_lengths_like_vector_quantize():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8)
    lens = torch.tensor([6, 2, 0])
    mask = torch.arange(6) < lens[:, None]
    kw = dict(dim=8, codebook_size=4, heads=2, separate_codebook_per_head=True)
    theirs = vqp.VectorQuantize(**kw)
    q1, i1, _, b1 = theirs(x, mask=mask, return_loss_breakdown=True)
    torch.manual_seed(0)
    ours = ProductQuantizer(**kw)
    q2, i2, loss, b2 = ours(x, mask=mask, return_loss_breakdown=True)
    assert q2.shape == q1.shape and i2.shape == i1.shape and b2._fields == b1._fields
    assert torch.equal(i2 == -1, i1 == -1) and torch.equal(
        i2 == -1, ~mask[..., None].expand(3, 6, 2)
    )
    assert torch.all(q2[~mask] == 0)
    torch.testing.assert_close(loss, ours.commitment_weight * b2.commitment)
    # lens= is the same as the prefix mask
    torch.manual_seed(0)
    with_lens = ProductQuantizer(**kw)(x, lens=lens)
    assert torch.equal(with_lens[1], i2) and torch.equal(with_lens[0], q2)


def test_padding_takes_no_part_in_learning_or_loss():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    kw = dict(kmeans_init=True, threshold_ema_dead_code=1.0, decay=0.5)
    masked = ProductQuantizer(8, 2, 4, **kw)
    valid_only = ProductQuantizer(8, 2, 4, **kw)
    valid_only.load_state_dict(masked.state_dict())
    torch.manual_seed(1)
    q, idx, loss = masked(x, mask=mask)
    torch.manual_seed(1)
    qv, idxv, lossv = valid_only(x[mask])
    for name in ("embed", "cluster_size", "embed_avg", "initted"):
        assert torch.equal(getattr(masked, name), getattr(valid_only, name)), name
    torch.testing.assert_close(loss, lossv)
    assert torch.equal(q[mask], qv) and torch.equal(idx[mask], idxv)
    assert torch.all(q[~mask] == 0) and torch.all(idx[~mask] == -1)
    # lens= gives the prefix mask; return_zeros_for_masked_padding=False passes x through
    keep = ProductQuantizer(8, 2, 4, return_zeros_for_masked_padding=False).eval()
    q, idx, _ = keep(x, lens=torch.tensor([3, 1]))
    assert torch.equal(q[0, 3:], x[0, 3:]) and torch.equal(q[1, 1:], x[1, 1:])
    assert torch.all(idx[0, 3:] == -1) and torch.all(idx[0, :3] >= 0)
    # -1 indices (padding) decode to zeros
    out = keep.get_output_from_indices(idx)
    assert torch.all(out[0, 3:] == 0) and torch.equal(out[0, :3], q[0, :3])
    # a batch with no valid token changes nothing and has zero loss
    fresh = ProductQuantizer(8, 2, 4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    _, _, loss = fresh(x, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert float(loss) == 0.0
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_freeze_codebook_and_expire_codes():
    torch.manual_seed(0)
    pq = ProductQuantizer(8, 2, 4, freeze_codebook=True)
    pq(torch.randn(50, 8))  # the k-means init still runs (as in VectorQuantize) ...
    assert bool(pq.initted)
    state = {k: v.clone() for k, v in pq.state_dict().items()}
    pq(torch.randn(50, 8) + 3)  # ... but nothing is learned after it
    assert all(torch.equal(v, state[k]) for k, v in pq.state_dict().items())
    assert float(pq.last_counts.sum()) == 50 * 2
    live = ProductQuantizer(8, 2, 4)
    live.load_state_dict(state)
    live(torch.randn(50, 8), freeze_codebook=True)  # per call
    assert torch.equal(live.embed, state["embed"])
    live(torch.randn(50, 8))
    assert not torch.equal(live.embed, state["embed"])
    # expire_codes_: re-seeds codes under the threshold from the given batch (training only)
    pq = ProductQuantizer(4, 1, 3, kmeans_init=False, threshold_ema_dead_code=1.0)
    with torch.no_grad():
        pq.cluster_size.copy_(torch.tensor([[5.0, 0.5, 0.5]]))
    x = torch.full((7, 4), 9.0)
    pq.eval().expire_codes_(x)
    assert not torch.any(pq.embed == 9.0)
    pq.train().expire_codes_(x)
    assert torch.all(pq.embed[0, 1:] == 9.0) and not torch.any(pq.embed[0, 0] == 9.0)
    assert torch.equal(pq.cluster_size, torch.tensor([[5.0, 1.0, 1.0]]))


def test_codebook_setter_continues_the_ema_from_the_new_codewords():
    pq = ProductQuantizer(4, 2, 3, kmeans_init=False, threshold_ema_dead_code=0, decay=0.5)
    new = torch.arange(12.0).reshape(2, 3, 2)
    pq.codebook = new
    assert torch.equal(pq.codebook, new)
    pq.eval()
    x = new.permute(1, 0, 2).reshape(3, 4)  # each token is exactly one codeword per sub-space
    assert pq(x)[1].tolist() == [[0, 0], [1, 1], [2, 2]]
    pq.train()
    pq(x)  # the EMA of codewords hit by themselves stays put
    torch.testing.assert_close(pq.codebook, new)
    with pytest.raises(ValueError, match=r"codebook: expected a tensor \(2, 3, 2\), got \(3, 2\)"):
        pq.codebook = torch.zeros(3, 2)


def test_rotation_trick_is_exact_forward_and_matches_vector_quantize_gradients():
    from pqmim_kernels.nn import _rotate_to

    torch.manual_seed(0)
    x = torch.randn(20, 12, requires_grad=True)
    q = torch.randn(20, 12)
    out = _rotate_to(x, q, 3)
    assert torch.equal(out, q)  # bit-exact codewords forward
    g = torch.randn(20, 12)
    (grad,) = torch.autograd.grad(out, x, g)
    # the gradient is rotated and scaled: norms per sub-vector scale by |q| / |x|
    xs, qs, gs, grs = (t.detach().reshape(20, 3, 4) for t in (x, q, g, grad))
    torch.testing.assert_close(
        grs.norm(dim=-1), gs.norm(dim=-1) * qs.norm(dim=-1) / xs.norm(dim=-1)
    )
    # the upstream gradient along q comes back along x
    along_q = (qs / qs.norm(dim=-1, keepdim=True)).reshape(20, 12)
    (grad_q,) = torch.autograd.grad(_rotate_to(x, q, 3), x, along_q)
    expect = (qs.norm(dim=-1, keepdim=True) / xs.norm(dim=-1, keepdim=True) ** 2) * xs
    torch.testing.assert_close(grad_q.reshape(20, 3, 4), expect)
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x2 = x.detach().reshape(20, 3, 4).clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(vqp.rotate_to(x2, q.reshape(20, 3, 4)), x2, g.reshape(20, 3, 4))
    torch.testing.assert_close(grad, theirs.reshape(20, 12))
    # in the module: VectorQuantize's form defaults to it, the forward stays exact
    pq = ProductQuantizer(12, 16, heads=3, separate_codebook_per_head=True)
    quantized, idx, _ = pq(x)
    assert pq.rotation_trick and torch.equal(quantized, pq.get_output_from_indices(idx))


def test_kmeans_init_uses_a_bounded_subsample_and_counts_every_token(monkeypatch):
    from pqmim_kernels import nn as pq_nn
    from pqmim_kernels.reference import pq as ref_pq

    seen = []
    real = ref_pq.kmeans

    def spy(x, *a, **k):
        seen.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(ref_pq, "kmeans", spy)
    monkeypatch.setattr(pq_nn, "KMEANS_MAX_POINTS_PER_CODE", 8)
    torch.manual_seed(0)
    pq = ProductQuantizer(6, 2, 4, threshold_ema_dead_code=0)
    pq(torch.randn(3, 100, 6))
    assert seen == [8 * 4]
    # the initial EMA counts are all 300 tokens' assignments (then one EMA step on the same batch)
    torch.testing.assert_close(pq.cluster_size.sum(-1), torch.full((2,), 300.0))


_UPSTREAM_README = {
    # blocks of vector-quantize-pytorch's README (v1.32), with only the import changed
    "usage": """
vq = VectorQuantize(
    dim = 256,
    codebook_size = 512,
    decay = 0.8,
    commitment_weight = 1.
)
x = torch.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x) # (1, 1024, 256), (1, 1024), (1)
""",
    "expiring stale codes": """
vq = VectorQuantize(
    dim = 256,
    codebook_size = 512,
    threshold_ema_dead_code = 2
)
x = torch.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x)
""",
    "multi-headed": """
vq = VectorQuantize(
    dim = 256,
    codebook_dim = 32,
    heads = 8,
    separate_codebook_per_head = True,
    codebook_size = 8196,
    accept_image_fmap = True
)
img_fmap = torch.randn(1, 256, 32, 32)
quantized, indices, loss = vq(img_fmap)
""",
}


@pytest.mark.parametrize(
    "name",
    [  # K = 8196 costs VectorQuantize ~5 s on one CPU thread
        pytest.param(n, marks=pytest.mark.slow) if n == "multi-headed" else n
        for n in sorted(_UPSTREAM_README)
    ],
)
def test_upstream_readme_examples_with_only_the_import_changed(name):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    results = []
    for cls in (vqp.VectorQuantize, ProductQuantizer):
        torch.manual_seed(0)
        scope = {"torch": torch, "VectorQuantize": cls}
        exec(_UPSTREAM_README[name], scope)
        results.append([scope[k] for k in ("quantized", "indices") if k in scope])
    for theirs, ours in zip(*results):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codebook_dim": 16}, r"codebook_dim · heads = 16 · 1 must equal dim = 256: there are no"),
        ({"use_cosine_sim": True}, r"option use_cosine_sim=True is not supported \(codebooks are"),
        ({"orthogonal_reg_weight": 10}, r"option orthogonal_reg_weight=10 is not supported"),
        ({"heads": 8}, r"heads = 8 with one shared codebook .* separate_codebook_per_head=True"),
        ({"learnable_codebook": True}, r"option learnable_codebook=True is not supported"),
    ],
)
def test_upstream_options_without_a_product_quantizer_meaning_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProductQuantizer(dim=256, codebook_size=256, **kwargs)


def test_vector_quantize_form_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'codebook_sise'"):
        ProductQuantizer(8, codebook_sise=4)
    with pytest.raises(TypeError, match="at most 3 positional arguments"):
        ProductQuantizer(8, 2, 4, 4)
    with pytest.raises(TypeError, match="missing required argument 'codebook_size'"):
        ProductQuantizer(8)
    with pytest.raises(TypeError, match="multiple values for argument 'codebook_size'"):
        ProductQuantizer(8, 4, codebook_size=4)
    with pytest.raises(ValueError, match="num_subspaces = 2 and heads = 4 name the same M"):
        ProductQuantizer(8, 2, 4, heads=4)
    with pytest.raises(ValueError, match="dim = 10 must be divisible by heads = 4"):
        ProductQuantizer(10, 4, heads=4, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match="sync_distributed and sync_codebook"):
        ProductQuantizer(8, 4, sync_codebook=True, sync_distributed=False)
    with pytest.raises(ValueError, match="kmeans_iters must be an int ≥ 0"):
        ProductQuantizer(8, 4, kmeans_iters=-1)
    pq = ProductQuantizer(8, 4)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"forward: VectorQuantize option topk= is not supported"):
        pq(x, topk=2)
    with pytest.raises(ValueError, match=r"option indices= is not supported"):
        pq(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="forward got an unexpected keyword argument 'maks'"):
        pq(x, maks=None)
    with pytest.raises(ValueError, match="give mask or lens, not both"):
        pq(x, mask=torch.ones(2, 3, dtype=torch.bool), lens=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        pq(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have the token shape \(2, 3\), got \(3, 2\)"):
        pq(x, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lens must be a tensor \(2,\)"):
        pq(x, lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lens needs sequences \(B, N, D\)"):
        pq(torch.randn(3, 8), lens=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="get_codes_from_indices: indices must be a tensor"):
        pq.get_codes_from_indices([0, 1])


def _upstream_autoencoder_run(VectorQuantize, steps, **vq_kwargs):
    """The training loop of vector-quantize-pytorch's examples/autoencoder.py (conv encoder,
    ``VectorQuantize(dim=32, accept_image_fmap=True, ...)``, conv decoder, L1 + 10 · commitment,
    AdamW), on synthetic 28×28 discs instead of FashionMNIST. Returns the last L1 loss, the
    number of codes in use and the indices' shape."""
    from torch import nn

    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.GELU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2),
        VectorQuantize(dim=32, accept_image_fmap=True, **vq_kwargs),
        nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, padding=1), nn.GELU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(16, 1, 3, padding=1),
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 28)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    for _ in range(steps):
        c = torch.rand(32, 2, 1, 1, generator=g) * 1.2 - 0.6
        r = torch.rand(32, 1, 1, generator=g) * 0.3 + 0.15
        disc = torch.sigmoid((r - ((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2).sqrt()) * 20)
        x = (disc * 2 - 1).unsqueeze(1)
        h = x
        for layer in model:
            if isinstance(layer, VectorQuantize):
                h, indices, cmt_loss = layer(h)
            else:
                h = layer(h)
        rec_loss = (h.clamp(-1.0, 1.0) - x).abs().mean()
        opt.zero_grad()
        (rec_loss + 10 * cmt_loss).backward()
        opt.step()
    return rec_loss.item(), indices.unique().numel(), indices.shape


@pytest.mark.parametrize(
    "vq_kwargs",
    [
        dict(codebook_size=64),
        dict(codebook_size=64, heads=4, separate_codebook_per_head=True, codebook_dim=8),
    ],
    ids=["one-codebook", "4-heads"],
)
@pytest.mark.slow  # ~5 s: both quantizers train
def test_upstream_autoencoder_example_trains_like_vector_quantize(vq_kwargs):
    """Same script, same seeds, only ``VectorQuantize`` swapped: ours reaches a comparable
    reconstruction loss (measured: one codebook 0.019 vs 0.021, 4 heads 0.0168 vs 0.0167 after
    150 steps of 64 images; this test runs 60 steps of 32)."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    theirs = _upstream_autoencoder_run(vqp.VectorQuantize, 60, **vq_kwargs)
    ours = _upstream_autoencoder_run(ProductQuantizer, 60, **vq_kwargs)
    assert ours[2] == theirs[2]
    assert ours[0] <= 1.25 * theirs[0], (ours, theirs)
    assert ours[1] >= 0.5 * theirs[1], (ours, theirs)


# ---- real torch.distributed group (gloo, 2 CPU processes) ---------------------------------------

WORLD = 2


def _global_batches(steps):
    """(steps, WORLD, 40, 8) tokens: the same global data on every rank; rank r uses [:, r]."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 6, 4, generator=g) * 3
    return torch.stack([mixture(WORLD * 40, centers, 0.3, g) for _ in range(steps)]).reshape(
        steps, WORLD, 40, 8
    )


def _ddp_worker(rank, store, out):
    """Body of one rank: trains two quantizers on this rank's shard and saves the results."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        batches = _global_batches(3)
        # (1) EMA statistics only: must equal one process seeing the whole global batch.
        torch.manual_seed(0)  # identical initial codebooks on every rank
        ema = ProductQuantizer(8, 2, 6, kmeans_init=False, threshold_ema_dead_code=0, decay=0.8)
        for xb in batches:
            ema(xb[rank])
        # (2) k-means init and dead-code restarts draw random numbers from each rank's own
        # generator and data: the broadcasts from rank 0 must still keep replicas identical.
        torch.manual_seed(100 + rank)
        full = ProductQuantizer(8, 2, 16, decay=0.5, threshold_ema_dead_code=4.0)
        first_codes = full(batches[0][rank])[1]
        first_cluster_size = full.cluster_size.clone()
        for xb in batches[1:]:
            full(xb[rank])
        torch.save(
            {
                "ema": ema.state_dict(),
                "full": full.state_dict(),
                "first_codes": first_codes,
                "first_cluster_size": first_cluster_size,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_keep_identical_codebooks(tmp_path):
    """A real 2-process gloo group (torch.multiprocessing.spawn): all-reduced statistics give
    the single-process update on the concatenated batch, and every replica stays identical
    through k-means init and dead-code restarts."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for part in ("ema", "full"):
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), (part, name)

    torch.manual_seed(0)
    single = ProductQuantizer(8, 2, 6, kmeans_init=False, threshold_ema_dead_code=0, decay=0.8)
    for xb in _global_batches(3):
        single(xb.reshape(-1, 8))
    for name in ("embed", "cluster_size", "embed_avg"):
        # Counts add exactly; sums are added in a different order than one index_add_.
        torch.testing.assert_close(ranks[0]["ema"][name], getattr(single, name))

    # After the k-means init, the EMA counts are all ranks' assignments to rank 0's centroids
    # (the first step assigns with those centroids and its counts equal the initial ones).
    codes = torch.cat([r["first_codes"] for r in ranks])
    expected = torch.stack([torch.bincount(codes[:, m], minlength=16) for m in range(2)]).float()
    alive = expected >= 4.0
    assert (~alive).any()  # some codes were under the threshold and got re-seeded ...
    first = ranks[0]["first_cluster_size"]
    assert torch.all(first[~alive] == 4.0)  # ... starting at the threshold pseudo-count
    assert torch.equal(first[alive], expected[alive])
