"""Training smoke tests: a few steps of both stages on tiny crops, checkpoints and resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import PQMIMConfig, load_model
from pqmim_kernels.models.train import TrainConfig, load_images, train

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


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (48, 48), (24, 70)]):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / ("sub" if i else ".") / f"im{i}.png")
    Image.fromarray(rng.integers(0, 256, (33, 35), dtype=np.uint8), "L").save(d / "grey.jpg")
    (d / "notes.txt").write_text("ignored")
    return d


def _cfg(tmp_path, data_dir, **kw):
    base = dict(
        data=str(data_dir),
        out=str(tmp_path / "run"),
        crop=32,
        batch_size=2,
        stage1_steps=3,
        stage2_steps=3,
        log_every=1,
        ckpt_every=2,
        warmup=2,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _log(tmp_path):
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_load_images(data_dir):
    imgs = load_images(data_dir)
    assert len(imgs) == 4
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in imgs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(data_dir / "nope")
    empty = data_dir.parent / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no .png/.jpg images"):
        load_images(empty)
    assert len(load_images(data_dir, max_images=2)) == 2


def test_train_two_stages_writes_a_usable_model(tmp_path, data_dir):
    model = train(_cfg(tmp_path, data_dir), TINY, log=lambda s: None)
    log = _log(tmp_path)
    assert [e["step"] for e in log if e["stage"] == 1] == [1, 2, 3]
    assert [e["step"] for e in log if e["stage"] == 2] == [1, 2, 3]
    first = log[0]
    for key in ("mse", "psnr", "ppl_mean", "ppl_min", "dead_frac", "lr"):
        assert np.isfinite(first[key])
    s2 = [e for e in log if e["stage"] == 2][0]
    assert 0 < s2["bpp"] < 2 * TINY.raw_bpp
    assert s2["raw_bpp"] == pytest.approx(TINY.raw_bpp)
    # the codebooks were k-means initialised (not the random init any more)
    assert bool(model.quantizer.initted)
    loaded = load_model(str(tmp_path / "run" / "model.pt"))
    assert loaded.model_id() == model.model_id()
    x = torch.rand(1, 3, 21, 30)
    assert torch.equal(loaded.decompress(model.compress(x)), model.decompress(model.compress(x)))


def test_resume_after_interruption(tmp_path, data_dir):
    class Stop(Exception):
        pass

    def stop_at_step_3(line):
        if "stage=1 step=3" in line:
            raise Stop

    cfg = _cfg(tmp_path, data_dir, stage1_steps=4, stage2_steps=2)
    with pytest.raises(Stop):
        train(cfg, TINY, log=stop_at_step_3)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["stage"] == 1 and ck["state"]["step"] == 2
    # the resumed run continues at step 3 and ignores a different model config
    other = PQMIMConfig(**{**TINY.__dict__, "mim_width": 32})
    model = train(cfg, other, log=lambda s: None)
    assert model.config == TINY
    steps1 = [e["step"] for e in _log(tmp_path) if e["stage"] == 1]
    assert steps1 == [1, 2, 3, 3, 4]
    # a longer stage-2 budget extends a finished run
    train(_cfg(tmp_path, data_dir, stage1_steps=4, stage2_steps=3), None, log=lambda s: None)
    assert [e["step"] for e in _log(tmp_path) if e["stage"] == 2] == [1, 2, 3]


def test_train_argument_errors(tmp_path, data_dir):
    with pytest.raises(ValueError, match="crop must be a positive multiple of 16, got 20"):
        train(_cfg(tmp_path, data_dir, crop=20), TINY)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train(_cfg(tmp_path, data_dir, batch_size=0), TINY)


def test_train_cli(tmp_path, data_dir, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "train", "--data", str(data_dir), "--out", str(out), "--crop", "32",
            "--batch-size", "2", "--stage1-steps", "2", "--stage2-steps", "2",
            "--channels", "8,8,8,8", "--latent-dim", "8", "--subspaces", "2",
            "--codebook-size", "16", "--mim-width", "16", "--mim-depth", "1",
            "--mim-heads", "2", "--stages", "4", "--no-progress", "--log-every", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert load_model(str(out / "model.pt")).config.stages == 4
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(out / "x")]) == 1
    assert "training data folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--channels", "8,8"])
    assert "channels must be 4 comma-separated ints" in capsys.readouterr().err


def test_torchrun_two_process_gloo_smoke(tmp_path, data_dir):
    """`torchrun --nproc_per_node 2 ... pqmim train` on the CPU (gloo DDP): both stages run, only
    rank 0 logs, prints and writes, and the written model round-trips."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pqmim_kernels.cli.main", "train", "--data", str(data_dir), "--out", str(out),
        "--crop", "32", "--batch-size", "2", "--stage1-steps", "3", "--stage2-steps", "3",
        "--channels", "8,8,8,8", "--latent-dim", "8", "--subspaces", "2", "--codebook-size", "16",
        "--mim-width", "16", "--mim-depth", "1", "--mim-heads", "2", "--stages", "4",
        "--no-progress", "--log-every", "1", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("pqmim train: wrote") == 1, r.stdout
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in log] == [(s, i) for s in (1, 2) for i in (1, 2, 3)]
    model = load_model(str(out / "model.pt"))
    x = torch.rand(1, 3, 20, 36)
    assert model.decompress(model.compress(x)).shape == (1, 3, 20, 36)
