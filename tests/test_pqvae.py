"""PQ-VAE transforms (models/pqvae.py): the default architecture is the original one, every
architecture option of PQMIMConfig builds, trains, saves and codes, and its errors."""

import json

import pytest
import torch
from _tiny import TINY

from pqmim_kernels.models import PQMIM, PQMIMConfig, load_model, save_model


def tiny_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    return PQMIM(config).eval()


WIDE = PQMIMConfig(
    **{
        **TINY.__dict__,
        "channels": (8, 8, 16, 32),
        "res_blocks": 2,
        "res_blocks_8": 1,
        "attention_blocks": 1,
    }
)


def test_default_architecture_is_the_original_layer_list():
    # The bundled weights were saved from this exact module tree: same names, same shapes.
    from pqmim_kernels.models import DEFAULT_MODEL_PATH
    from pqmim_kernels.models.pqvae import Decoder, Encoder

    blob = torch.load(str(DEFAULT_MODEL_PATH), map_location="cpu", weights_only=True)
    keys = ("channels", "latent_dim", "num_subspaces", "res_blocks")
    cfg = PQMIMConfig(**{k: blob["config"][k] for k in keys})
    for part, cls in (("encoder", Encoder), ("decoder", Decoder)):
        fresh = cls.from_config(cfg).state_dict()
        stored = {
            k[len(part) + 1 :]: v for k, v in blob["state_dict"].items() if k.startswith(part + ".")
        }
        assert {k: tuple(v.shape) for k, v in fresh.items()} == {
            k: tuple(v.shape) for k, v in stored.items()
        }
    # new fields at their defaults stay out of the JSON hashed into the model id
    text = PQMIMConfig().to_json()
    changed = {"res_blocks_8": 1, "attention_blocks": 1, "stem": "unshuffle", "latent_norm": "l2"}
    for name, value in changed.items():
        assert name not in text
        assert f'"{name}": {json.dumps(value)}' in PQMIMConfig(**{name: value}).to_json()
    assert tiny_model(config=WIDE).model_id() != tiny_model(config=TINY).model_id()


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"res_blocks_8": 2},
        {"attention_blocks": 1},
        {"stem": "unshuffle"},
        {"latent_norm": "l2"},
        {"res_blocks": 0, "res_blocks_8": 1, "attention_blocks": 2, "stem": "unshuffle"},
    ],
)
def test_architecture_options_shapes_and_round_trip(over, tmp_path):
    cfg = PQMIMConfig(**{**WIDE.__dict__, **over})
    model = tiny_model(config=cfg).train()
    x = torch.rand(2, 3, 40, 23)
    y = model.encode_latent(x)
    assert y.shape == (2, 3, 2, cfg.latent_dim)
    q, codes, vq_loss = model.quantize(y)
    assert codes.shape == (2, 3, 2, 2)
    x_hat = model.decoder(q.permute(0, 3, 1, 2))
    assert x_hat.shape == (2, 3, 48, 32)
    (torch.nn.functional.mse_loss(x_hat[..., :40, :23], x) + vq_loss).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    save_model(model.eval(), tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.config == cfg
    codes = loaded.encode_codes(x[:1])
    x_dec = loaded.decode_codes(codes, size=(40, 23))
    assert x_dec.shape == (1, 3, 40, 23)
    # fp16 storage: the decoder reproduces the original within half precision
    ref = model.decode_codes(codes, size=(40, 23))
    assert torch.allclose(x_dec, ref, atol=2e-2)


def test_attention_block_is_identity_at_init_and_mixes_positions():
    from pqmim_kernels.models.pqvae import AttentionBlock

    torch.manual_seed(0)
    blk = AttentionBlock(128)
    assert blk.heads == 2
    x = torch.randn(2, 128, 3, 5)
    assert torch.equal(blk(x), x)
    torch.nn.init.normal_(blk.proj.weight, std=0.1)
    y = blk(x)
    x2 = x.clone()
    x2[:, :, 2, 4] += 1.0  # one far-away position changes every output position
    assert (blk(x2) - y)[:, :, 0, 0].abs().max() > 0
    with pytest.raises(ValueError, match="channels must be < 64 or a multiple of 64, got 96"):
        AttentionBlock(96)


def test_subspace_l2_norm():
    from pqmim_kernels.models.pqvae import SubspaceL2Norm

    y = torch.randn(2, 3, 4, 12) * 5
    z = SubspaceL2Norm(12, 3)(y)
    norms = z.unflatten(-1, (3, 4)).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 2.0), atol=1e-5)
    # direction kept per sub-vector
    zs, ys = z.unflatten(-1, (3, 4)), y.unflatten(-1, (3, 4))
    cos = torch.nn.functional.cosine_similarity(zs, ys, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    enc = tiny_model(config=PQMIMConfig(**{**TINY.__dict__, "latent_norm": "l2"})).encoder
    assert isinstance(enc.norm, SubspaceL2Norm)


def test_architecture_config_errors():
    with pytest.raises(ValueError, match="res_blocks_8 must be an int >= 0, got -1"):
        PQMIMConfig(res_blocks_8=-1)
    with pytest.raises(ValueError, match="attention_blocks must be an int >= 0, got True"):
        PQMIMConfig(attention_blocks=True)
    with pytest.raises(ValueError, match=r"attention blocks need channels\[3\] < 64 or a multiple"):
        PQMIMConfig(channels=(8, 8, 8, 96), attention_blocks=1)
    with pytest.raises(ValueError, match="stem must be 'conv' or 'unshuffle', got 'pixel'"):
        PQMIMConfig(stem="pixel")
    with pytest.raises(ValueError, match="latent_norm must be 'layer' or 'l2', got 'batch'"):
        PQMIMConfig(latent_norm="batch")
    from pqmim_kernels.models.pqvae import Decoder, Encoder

    with pytest.raises(ValueError, match=r"PQ-VAE: stem must be one of \('conv', 'unshuffle'\)"):
        Encoder((8, 8, 8, 8), 8, stem="nope")
    with pytest.raises(ValueError, match="PQ-VAE: res_blocks_8 must be an int >= 0, got -2"):
        Decoder((8, 8, 8, 8), 8, res_blocks_8=-2)
