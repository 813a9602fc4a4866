"""Training smoke tests: a few steps of both stages on tiny crops, checkpoints and resume."""

import json

import numpy as np
import pytest
import torch
from _tiny import TINY
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import PQMIMConfig, load_model
from pqmim_kernels.models.train import TrainConfig, load_images, train


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
    # both stages' steps, then one summary of the exported integer entropy model (stage 3)
    assert [(e["stage"], e["step"]) for e in log] == [
        *((s, i) for s in (1, 2) for i in (1, 2, 3)), (3, 3)]  # fmt: skip
    assert log[-1]["int_bits_per_token"] > 0 and "int_overhead" in log[-1]
    model = load_model(str(out / "model.pt"))
    x = torch.rand(1, 3, 20, 36)
    assert model.decompress(model.compress(x)).shape == (1, 3, 20, 36)


# ---- stage 1: held-out split, validation, autoencoder warm-up, seeded runs ----


def test_split_holdout_rule():
    from pqmim_kernels.models.train import split_holdout

    items = list(range(25))
    kept, held = split_holdout(items, 10)
    assert held == [9, 19]
    assert kept == [i for i in items if i not in (9, 19)]
    assert split_holdout(items, 0) == (items, [])
    assert split_holdout(items[:3], 10) == (items[:3], [])  # too few for one held-out image
    assert split_holdout(items[:4], 2) == ([0, 2], [1, 3])
    for bad in (1, -1, 2.0, True):
        with pytest.raises(ValueError, match="holdout_every must be 0 or an int >= 2, got"):
            split_holdout(items, bad)


def test_validation_psnr_matches_a_direct_computation():
    from pqmim_kernels.models import PQMIM
    from pqmim_kernels.models.codec import pad_to_multiple
    from pqmim_kernels.models.train import validation_psnr

    torch.manual_seed(0)
    model = PQMIM(TINY).train()
    imgs = [torch.randint(0, 256, (3, 20, 37), dtype=torch.uint8) for _ in range(2)]
    got = validation_psnr(model, imgs)
    assert model.training  # mode restored
    model.eval()
    mses = []
    for img in imgs:
        x = img[None].float() / 255
        x_hat = model.decode_codes(model.encode_codes(pad_to_multiple(x)), size=(20, 37))
        mses.append(float(((x_hat - x) ** 2).mean()))
    assert got["images"] == 2
    assert got["psnr"] == pytest.approx(-10 * np.log10(np.mean(mses)), abs=1e-4)
    assert got["psnr_mean"] == pytest.approx(np.mean([-10 * np.log10(m) for m in mses]), abs=1e-4)
    ae = validation_psnr(model, imgs, quantize=False)
    err = []
    with torch.no_grad():
        for img in imgs:
            x = img[None].float() / 255
            x_hat = model.decoder(model.encoder(pad_to_multiple(x)))[..., :20, :37].clamp(0, 1)
            err.append(float(((x_hat - x) ** 2).mean()))
    assert ae["psnr"] == pytest.approx(-10 * np.log10(np.mean(err)), abs=1e-4)
    with pytest.raises(ValueError, match="validation_psnr: no images"):
        validation_psnr(model, [])


def test_stage1_logs_held_out_psnr_and_warm_up(tmp_path, data_dir):
    cfg = _cfg(
        tmp_path,
        data_dir,
        stage1_steps=6,
        holdout_every=2,
        val_every=3,
        ae_warmup=0.4,
        kmeans_batches=3,
        channels_last=True,
        budget_clock="cpu",
        stage1_only=True,
    )
    model = train(cfg, TINY, log=lambda s: None)
    assert not model.training and bool(model.quantizer.initted)
    assert not (tmp_path / "run" / "model.pt").exists()
    log = _log(tmp_path)
    steps = [e for e in log if "psnr" in e]
    # steps 1-3 (progress 0, 1/6, 2/6 < 0.4) without the PQ, then with it
    assert [e["pq"] for e in steps] == [False] * 3 + [True] * 3
    assert all(0 <= e["unused_frac"] <= 1 and e["cpu_s"] >= 0 for e in steps)
    val = [e for e in log if "val_psnr" in e or "val_psnr_ae" in e]
    # at step 3 (AE, also serving as the one before the switch-on), at the end (quantized)
    assert [(e["step"], "val_psnr" in e) for e in val] == [(3, False), (6, True)]
    assert all(e["val_images"] == 2 for e in val) and np.isfinite(val[-1]["val_psnr"])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["stage"] == 2 and ck["state"]["step"] == 0
    # resuming a finished stage 1 with stage1_only does nothing more
    train(cfg, TINY, log=lambda s: None)
    assert len(_log(tmp_path)) == len(log)


def test_stage1_option_errors(tmp_path, data_dir):
    with pytest.raises(ValueError, match="budget_clock must be 'wall' or 'cpu', got 'gpu'"):
        train(_cfg(tmp_path, data_dir, budget_clock="gpu", stage1_only=True), TINY)
    with pytest.raises(ValueError, match=r"ae_warmup must lie in \[0, 1\), got 1.0"):
        train(_cfg(tmp_path, data_dir, ae_warmup=1.0, stage1_only=True), TINY)


def test_init_run_then_resume_keeps_the_seeded_architecture(tmp_path, data_dir):
    from pqmim_kernels.models.train import init_run

    wide = PQMIMConfig(
        **{**TINY.__dict__, "channels": (8, 8, 8, 16), "res_blocks_8": 1, "attention_blocks": 1}
    )
    out = tmp_path / "run"
    path = init_run(out, wide)
    assert path == out / "checkpoint.pt"
    with pytest.raises(FileExistsError, match="exists; resume it or choose another folder"):
        init_run(out, wide)
    model = train(_cfg(tmp_path, data_dir, stage1_steps=2, stage1_only=True), TINY)
    assert model.config == wide
    assert [e["step"] for e in _log(tmp_path) if "psnr" in e] == [1, 2]


def test_kmeans_switch_on_keeps_one_batch_of_ema_counts():
    from pqmim_kernels.models import PQMIM
    from pqmim_kernels.models.train import _VAE, _kmeans_switch_on

    torch.manual_seed(0)
    model = PQMIM(TINY).train()
    imgs = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8) for _ in range(3)]
    cfg = TrainConfig(crop=64, batch_size=4, kmeans_batches=4)
    _kmeans_switch_on(model, _VAE(model), cfg, imgs, torch.Generator().manual_seed(0), "cpu")
    q = model.quantizer
    assert bool(q.initted)
    per_batch = 4 * (64 // 16) ** 2  # tokens of one batch
    # k-means over 4 batches, counts back at one batch's scale; dead-code re-seeds (count =
    # threshold, then / 4) can move each sub-space's total by at most K * threshold / 4
    slack = TINY.codebook_size * q.threshold_ema_dead_code / 4
    assert torch.all((q.cluster_size.sum(-1) - per_batch).abs() <= slack)


def test_init_from_skips_stage_1_and_keeps_the_pq_vae(tmp_path, data_dir):
    from pqmim_kernels.models import save_model

    src = train(_cfg(tmp_path, data_dir, out=str(tmp_path / "src")), TINY, log=lambda s: None)
    save_model(src, tmp_path / "src.pt")
    lines = []
    cfg = _cfg(tmp_path, data_dir, init_from=str(tmp_path / "src.pt"))
    model = train(cfg, TINY, log=lines.append)
    assert any("training the entropy model (stage 2)" in line for line in lines)
    assert not [e for e in _log(tmp_path) if e["stage"] == 1]
    for name, v in src.state_dict().items():
        if name.startswith(("encoder.", "quantizer.", "decoder.")):
            assert torch.equal(model.state_dict()[name], v), name


def test_warm_start_refits_another_pq_on_the_same_autoencoder(tmp_path, data_dir):
    from pqmim_kernels.models import save_model

    src = train(_cfg(tmp_path, data_dir, out=str(tmp_path / "src")), TINY, log=lambda s: None)
    save_model(src, tmp_path / "src.pt")
    m = 2 * TINY.num_subspaces
    other = PQMIMConfig(**{**TINY.__dict__, "num_subspaces": m, "channels": (8, 8, 8, 16)})
    lines = []
    cfg = _cfg(tmp_path, data_dir, warm_start=str(tmp_path / "src.pt"), lr1=0.0, holdout_every=2,
               kmeans_batches=2, stage1_only=True)  # fmt: skip
    model = train(cfg, other, log=lines.append)
    # the autoencoder's shape comes from the file, the quantizer's from the given config
    assert model.config.channels == TINY.channels and model.config.num_subspaces == m
    assert model.quantizer.codebooks.shape == (m, TINY.codebook_size, TINY.latent_dim // m)
    assert bool(model.quantizer.initted)
    assert any(f"re-fits the PQ (M={m}" in line for line in lines)
    # lr 0: the encoder and decoder are the file's, unchanged by the fine-tuning steps
    for name, v in src.state_dict().items():
        if name.startswith(("encoder.", "decoder.")):
            assert torch.equal(model.state_dict()[name], v), name
    # the held-out PSNR of the unquantized autoencoder, before the k-means fit, then quantized
    val = [e for e in _log(tmp_path) if "val_psnr" in e or "val_psnr_ae" in e]
    assert [(e["step"], "val_psnr" in e) for e in val] == [(0, False), (3, True)]
    assert all(e["pq"] for e in _log(tmp_path) if "psnr" in e)


def test_warm_start_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="warm_start file .*nope.pt does not exist"):
        train(_cfg(tmp_path, data_dir, warm_start=str(tmp_path / "nope.pt")), TINY)
    with pytest.raises(ValueError, match="give init_from .* or warm_start .*, not both"):
        train(_cfg(tmp_path, data_dir, warm_start="a.pt", init_from="b.pt"), TINY)
    from pqmim_kernels.models import PQMIM, save_model

    save_model(PQMIM(TINY), tmp_path / "src.pt")  # latent_dim 8
    three = PQMIMConfig(**{**TINY.__dict__, "latent_dim": 12, "num_subspaces": 3})
    with pytest.raises(ValueError, match="latent_dim 8, which num_subspaces 3 does not divide"):
        train(_cfg(tmp_path, data_dir, warm_start=str(tmp_path / "src.pt")), three)
