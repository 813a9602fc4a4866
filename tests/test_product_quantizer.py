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
