"""Test helper: make an untrained PQMIM able to code (calibrate its float entropy model on random
codes and export the integer model), as ``pqmim train`` does at the end of stage 2."""

import torch

from pqmim_kernels.models.mim import stage_grid


def make_coding_ready(model, seed: int = 0):
    """Calibrate ``model.entropy_model`` on random code windows and export it; returns model."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size, (3, 8, 9, cfg.num_subspaces), generator=g)
    with torch.no_grad():
        model.entropy_model.calibrate([(codes, stage_grid(8, 9, cfg.stages))])
    model.export_entropy_model()
    return model
