"""Test helpers: the tiny model config the tests share, and making an untrained PQMIM able to
code (calibrate its float entropy model on random codes and export the integer model), as
``pqmim train`` does at the end of stage 2."""

import torch

from pqmim_kernels.models.config import PQMIMConfig
from pqmim_kernels.models.mim import stage_grid

# A model small enough for tests on 2 CPU cores: M = 2 sub-spaces of K = 16 codes, 6 stages.
TINY = PQMIMConfig(
    channels=(8, 8, 8, 8),
    latent_dim=8,
    num_subspaces=2,
    codebook_size=16,
    mim_width=16,
    mim_depth=1,
    mim_heads=2,
    stages=6,
)


def make_coding_ready(model, seed: int = 0):
    """Calibrate ``model.entropy_model`` on random code windows and export it; returns model."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size, (3, 8, 9, cfg.num_subspaces), generator=g)
    with torch.no_grad():
        model.entropy_model.calibrate([(codes, stage_grid(8, 9, cfg.stages))])
    model.export_entropy_model()
    return model


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) float in [0, 1]: a smooth random image plus noise, so codes vary across the
    token grid."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(1, h // 8 + 1), max(1, w // 8 + 1), generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def coding_tiny(image_seed: int = 9):
    """An untrained :data:`TINY` PQMIM (torch seed 0) whose codebooks were k-means-initialised
    on a smooth image's latents, coding-ready (:func:`make_coding_ready`), in eval mode."""
    from pqmim_kernels.models import PQMIM

    torch.manual_seed(0)
    m = PQMIM(TINY).train()
    with torch.no_grad():
        m.quantize(m.encode_latent(smooth_image(64, 64, image_seed).expand(4, 3, 64, 64)))
    return make_coding_ready(m.eval(), 0)
