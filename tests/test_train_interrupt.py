"""Ctrl-C during training saves a checkpoint, and a resumed run says what it resumes."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny import TINY as TINY6
from PIL import Image

from pqmim_kernels.models.train import TrainConfig, train

TINY = dataclasses.replace(TINY6, stages=4)


@pytest.fixture
def cfg(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return TrainConfig(
        data=str(d),
        out=str(tmp_path / "run"),
        crop=32,
        batch_size=2,
        stage1_steps=5,
        stage2_steps=3,
        log_every=1,
        ckpt_every=100,  # no periodic checkpoint before the interrupt
        warmup=2,
        progress=False,
    )


def _interrupt_at(marker):
    lines = []

    def log(line):
        lines.append(line)
        if marker in line and not any("interrupted" in x for x in lines):
            raise KeyboardInterrupt

    return log, lines


@pytest.mark.parametrize("stage,step", [(1, 3), (2, 2)])
def test_ctrl_c_saves_a_checkpoint_and_resume_says_so(cfg, stage, step):
    log, lines = _interrupt_at(f"stage={stage} step={step}")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, TINY, log=log)
    ck_path = f"{cfg.out}/checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    assert (ck["state"]["stage"], ck["state"]["step"]) == (stage, step)
    assert lines[-1] == (
        f"interrupted: saved {ck_path} at step {step} of stage {stage}; "
        "run the same command again to resume"
    )
    resumed = []
    train(cfg, None, log=resumed.append)
    assert resumed[0] == f"resuming from {ck_path}: step {step} of stage {stage}"
    log_rows = [json.loads(x) for x in open(f"{cfg.out}/log.jsonl")]
    done = [(e["stage"], e["step"]) for e in log_rows if "lr" in e]  # the per-step rows
    assert done[-1] == (2, 3)
    assert done.count((stage, step + 1)) == 1  # continued after the saved step


def test_other_exceptions_do_not_save(cfg):
    def log(line):
        if "stage=1 step=2" in line:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, TINY, log=log)
    from pathlib import Path

    assert not (Path(cfg.out) / "checkpoint.pt").exists()
