"""Decoder refinement (``pqmim refine-decoder``, :mod:`pqmim_kernels.models.refine`), the grown
decoder it trains (``decoder_extra_blocks``, :func:`grow_decoder`) and the model variants that
keep a refined model's predecessor decodable from the same file (``save_model(variants=)``,
``load_model(variant=)``, ``Preset.variant``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny import TINY, make_coding_ready

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import (
    PQMIM,
    PQMIMConfig,
    compress_image,
    decompress_image,
    load_model,
    model_for_file,
    presets,
    save_model,
)
from pqmim_kernels.models.pqvae import Decoder, grow_decoder
from pqmim_kernels.models.presets import Preset
from pqmim_kernels.models.refine import (
    RefineConfig,
    _windows,
    code_images,
    refine_decoder,
    refined_model,
)
from pqmim_kernels.models.train import validation_psnr


def _model(seed: int = 0) -> PQMIM:
    torch.manual_seed(seed)
    model = PQMIM(TINY).train()
    with torch.no_grad():
        model.quantize(model.encode_latent(torch.rand(4, 3, 64, 64)))
    return make_coding_ready(model.eval(), seed=seed)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = 48 + 16 * (i % 2), 64 + 8 * i  # ragged: not all multiples of 16
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        base = torch.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 2 % 256])
        noise = torch.randint(-20, 20, (3, h, w), generator=g)
        out.append((base + noise).clamp(0, 255).to(torch.uint8))
    return out


def _photo_folder(tmp_path, n: int = 10):
    """A folder of ``n`` PNGs of :func:`_images` (every 10th is held out by the CLI)."""
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for i, img in enumerate(_images(n)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(data / f"{i:02d}.png")
    return data


# ------------------------------------------------------------------ config and grown decoder
def test_decoder_extra_blocks_leave_old_model_ids_alone():
    assert "decoder_extra_blocks" not in PQMIMConfig().to_json()  # old ids unchanged
    cfg = PQMIMConfig(decoder_extra_blocks=[1, 0, 2])  # lists (from JSON) become tuples
    assert cfg.decoder_extra_blocks == (1, 0, 2)
    assert json.loads(cfg.to_json())["decoder_extra_blocks"] == [1, 0, 2]
    assert PQMIMConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad in ((1, 2), (1, -1, 0), (1, 0.5, 0), (True, 0, 0), 3):
        with pytest.raises(ValueError, match="decoder_extra_blocks must be 3 ints"):
            PQMIMConfig(decoder_extra_blocks=bad)


def test_a_grown_decoder_starts_as_the_old_one_and_keeps_its_layers():
    torch.manual_seed(0)
    old = Decoder((8, 8, 8, 8), 8, 1).eval()
    new = Decoder((8, 8, 8, 8), 8, 1, extra_blocks=(2, 1, 1)).eval()
    assert len(new.net) == len(old.net) + 4
    grow_decoder(old, new)
    y = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        assert torch.equal(new(y), old(y))
    # trained further, it grows again: its extra blocks are kept, the new ones start at zero
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn_like(p))
    newer = Decoder((8, 8, 8, 8), 8, 1, extra_blocks=(3, 1, 1)).eval()
    grow_decoder(new, newer)
    with torch.no_grad():
        assert torch.equal(newer(y), new(y))
    with pytest.raises(ValueError, match="lacks layers"):
        grow_decoder(new, Decoder((8, 8, 8, 8), 8, 1, extra_blocks=(1, 1, 1)))
    with pytest.raises(ValueError, match="differs in shape"):
        grow_decoder(old, Decoder((8, 8, 16, 8), 8, 1))


def test_refined_model_keeps_codes_and_entropy_model():
    model = _model()
    new = refined_model(model, (1, 1, 0))
    assert new.config.decoder_extra_blocks == (1, 1, 0)
    assert new.model_id() != model.model_id()
    x = torch.rand(1, 3, 48, 64)
    assert torch.equal(new.encode_codes(x), model.encode_codes(x))
    img = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    a, b = compress_image(img, model), compress_image(img, new)
    assert len(a) == len(b) and a[3:5] == model.model_id() and b[3:5] == new.model_id()
    assert torch.equal(model.decompress_codes(a)[0], new.decompress_codes(b)[0])
    assert np.array_equal(decompress_image(a, model), decompress_image(b, new))  # identity at init


# ------------------------------------------------------------------------------ training
def test_windows_mask_the_margins_that_are_not_image_edges():
    model = _model()
    coded = code_images(model, [torch.zeros(3, 80, 96, dtype=torch.uint8)])  # 5 x 6 tokens
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        y, x, mask = _windows(coded, 3, 2, gen, model.dequantize, "cpu")
        assert y.shape == (2, TINY.latent_dim, 3, 3) and x.shape == (2, 3, 48, 48)
        assert mask.shape == (2, 1, 48, 48) and mask.dtype == torch.bool
        assert mask[:, :, 16:32, 16:32].all()  # the centre token always counts
    # a window larger than the image: edge-replicated, and the padding is outside the loss
    y, x, mask = _windows(coded, 8, 1, gen, model.dequantize, "cpu")
    assert mask[0, 0, :80, :96].all() and not mask[0, 0, 80:].any() and not mask[0, 0, :, 96:].any()


def test_refine_decoder_trains_checkpoints_and_resumes(tmp_path):
    model = _model()
    images = _images(3)
    cfg = RefineConfig(extra_blocks=(1, 0, 1), steps=40, batch_size=2, crop=32, lr=3e-3, warmup=5,
                       log_every=10, val_every=20, save_every=10)  # fmt: skip
    before = validation_psnr(model, images)["psnr"]
    half = dataclasses.replace(cfg, steps=20)
    refine_decoder(model, images, images, half, tmp_path, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_psnr"] == pytest.approx(before, abs=1e-6)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 20
    # the same run continued to 40 steps: it resumes at 20 (no second step-0 row)
    got = refine_decoder(model, images, images, cfg, tmp_path, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mse" in r] == [10, 20, 30, 40]
    assert sum(r["step"] == 0 for r in rows) == 1
    assert rows[-1]["event"] == "end" and rows[-1]["step"] == 40
    after = validation_psnr(got, images)["psnr"]
    assert rows[-1]["val_psnr"] == pytest.approx(after, abs=1e-4)
    assert after > before + 0.3  # 40 steps on these images move a random decoder a lot
    assert got.training_info["refine"]["steps_done"] == 40
    # the source model is untouched; codes are the same
    assert validation_psnr(model, images)["psnr"] == pytest.approx(before, abs=1e-9)
    x = images[0][None].float() / 255
    assert torch.equal(got.encode_codes(x[..., :48, :64]), model.encode_codes(x[..., :48, :64]))
    with pytest.raises(ValueError, match=r"grew the decoder by \(1, 0, 1\), not \(2, 0, 0\)"):
        refine_decoder(model, images, [], dataclasses.replace(cfg, extra_blocks=(2, 0, 0)),
                       tmp_path, log=lambda s: None)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("extra_blocks", (1, 1), "extra_blocks must be 3 ints"),
        ("crop", 40, "crop must be a positive multiple of 16"),
        ("steps", 0, "steps must be a positive int"),
        ("minutes", -1.0, "minutes must be >= 0"),
        ("lr", 0.0, "lr must be > 0"),
    ],
)
def test_refine_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        RefineConfig(**{field: value})


def test_refine_needs_images(tmp_path):
    with pytest.raises(ValueError, match="no training images"):
        refine_decoder(_model(), [], [], RefineConfig(steps=1), tmp_path)
    with pytest.raises(ValueError, match="expected uint8"):
        code_images(_model(), [torch.zeros(3, 16, 16)])


# ------------------------------------------------------------------------------- variants
def _refined_pair(tmp_path):
    old = _model()
    path = tmp_path / "old.pt"
    save_model(old, path)
    old = load_model(path)  # as stored (fp16): what a bundled model is
    new = refined_model(old, (1, 0, 0))
    with torch.no_grad():
        for p in new.decoder.parameters():  # trained, and fp16 values as a stored model has
            p.copy_((p + 0.01 * torch.randn_like(p)).half().float())
    return old, new


def test_a_variant_reproduces_its_model_and_decodes_its_files(tmp_path):
    old, new = _refined_pair(tmp_path)
    x = torch.rand(1, 3, 40, 56)
    img = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    data = compress_image(img, old)
    path = tmp_path / "new.pt"
    save_model(new, path, variants={"old-v1": old})
    assert load_model(path).model_id() == new.model_id()
    back = load_model(path, variant="old-v1")
    assert back.model_id() == old.model_id() and back.config == old.config
    assert np.array_equal(decompress_image(data, back), decompress_image(data, old))
    assert back.training_info["variant"] == "old-v1"
    with pytest.raises(ValueError, match=r"holds no variant 'nope' \(it holds: old-v1\)"):
        load_model(path, variant="nope")
    with pytest.raises(ValueError, match=r"holds no variant 'old-v1' \(it holds: none\)"):
        load_model(tmp_path / "old.pt", variant="old-v1")


def test_a_damaged_variant_is_refused(tmp_path):
    old, new = _refined_pair(tmp_path)
    path = tmp_path / "new.pt"
    save_model(new, path, variants={"v1": old})
    blob = torch.load(path, weights_only=True)
    name = next(iter(blob["variants"]["v1"]["decoder"]))
    blob["variants"]["v1"]["decoder"][name] = blob["variants"]["v1"]["decoder"][name] + 1
    torch.save(blob, path)
    with pytest.raises(ValueError, match=r"variant 'v1' of .* gives model id .*damaged"):
        load_model(path, variant="v1")


def test_only_a_decoder_may_differ_in_a_variant(tmp_path):
    old, new = _refined_pair(tmp_path)
    other = _model(seed=3)
    with pytest.raises(ValueError, match="other encoder, quantizer or entropy-model weights"):
        save_model(new, tmp_path / "x.pt", variants={"v": other})
    wider = PQMIM(dataclasses.replace(TINY, commitment=0.5))
    with pytest.raises(ValueError, match=r"differs from the model in \['commitment'\]"):
        save_model(new, tmp_path / "x.pt", variants={"v": wider})
    bad_int = refined_model(old, (0, 0, 0))
    tensors, meta = bad_int.int_state()
    tensors = {k: v.clone() for k, v in tensors.items()}
    k = next(k for k, v in tensors.items() if v.numel())
    tensors[k].view(-1)[0] += 1
    bad_int.set_int_entropy_model(tensors, meta)
    with pytest.raises(ValueError, match="another integer entropy model"):
        save_model(new, tmp_path / "x.pt", variants={"v": bad_int})


def test_a_retired_variant_preset_decodes_its_files(tmp_path, monkeypatch):
    """How a bundled model is retired when a refined one replaces it: the new file holds the old
    model as a variant, and the retired preset names the variant."""
    old, new = _refined_pair(tmp_path)
    img = (torch.rand(40, 56, 3) * 255).round().to(torch.uint8).numpy()
    data = compress_image(img, old)
    path = tmp_path / "new.pt"
    save_model(new, path, variants={"v1": old})
    monkeypatch.setattr(presets, "PRESETS", (Preset("tiny", str(path), 1, "tiny, refined", 0.5),))
    monkeypatch.setattr(presets, "RETIRED", (
        Preset("tiny-v1", str(path), 0, "tiny, first decoder", 0.5, variant="v1"),))  # fmt: skip
    monkeypatch.setattr(presets, "DEFAULT_PRESET", "tiny")
    assert load_model("tiny").model_id() == new.model_id()
    assert load_model("tiny-v1").model_id() == old.model_id()
    with pytest.raises(ValueError, match="preset tiny-v1 is variant 'v1', not 'v2'"):
        load_model("tiny-v1", variant="v2")
    got, preset = model_for_file(data)
    assert preset.name == "tiny-v1" and got.model_id() == old.model_id()
    assert np.array_equal(decompress_image(data), decompress_image(data, old))
    fresh = compress_image(img)  # the default preset: the refined model
    assert model_for_file(fresh)[1].name == "tiny"


def test_int_tables_are_stored_narrow_and_load_exactly(tmp_path):
    model = _model()
    tensors, _ = model.int_state()
    assert any(v.dtype == torch.int16 for v in tensors.values())
    assert all(v.dtype != torch.int64 for v in tensors.values())
    save_model(model, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.model_id() == load_model(tmp_path / "m.pt").model_id()
    assert all(torch.equal(back._int_tensors[k], model._int_tensors[k]) for k in model._int_tensors)


# ------------------------------------------------------------------------------------ CLI
def _decoder_args(src, data, out, tmp_path, steps: int, blocks: str) -> list[str]:
    return ["refine-decoder", "--model", str(src), "--data", str(data), "--out", str(out),
            "--run-dir", str(tmp_path / "run"), "--steps", str(steps), "--crop", "32",
            "--batch-size", "2", "--extra-blocks", blocks]  # fmt: skip


def test_cli_refine_decoder(tmp_path, capsys):
    src = tmp_path / "src.pt"
    save_model(_model(), src)
    data = _photo_folder(tmp_path)
    out = tmp_path / "refined.pt"
    args = _decoder_args(src, data, out, tmp_path, 4, "1,0,0")
    assert main([*args, "--keep-variant", "first"]) == 0
    said = capsys.readouterr().out
    old, new = load_model(src), load_model(out)
    assert f"model id {new.model_id().hex()}" in said
    assert f"variant first = model id {old.model_id().hex()}" in said
    assert load_model(out, variant="first").model_id() == old.model_id()
    assert new.config.decoder_extra_blocks == (1, 0, 0)
    assert main(args) == 1  # the output exists
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args[:-2], "--extra-blocks", "1,2", "-f"])
    assert "must be 3 comma-separated ints >= 0" in capsys.readouterr().err


def test_cli_refine_decoder_carries_the_source_files_variants(tmp_path, capsys):
    """Refining a model whose file holds variants (a bundled preset's, refined again) keeps
    them: every file they wrote still decodes from the new file."""
    from pqmim_kernels.models import load_variants

    old, new = _refined_pair(tmp_path)
    src = tmp_path / "src.pt"
    save_model(new, src, variants={"v1": old})
    data = _photo_folder(tmp_path)
    out = tmp_path / "again.pt"
    args = _decoder_args(src, data, out, tmp_path, 2, "0,1,0")
    assert main([*args, "--keep-variant", "v2"]) == 0
    held = load_variants(out)
    assert sorted(held) == ["v1", "v2"]
    assert held["v1"].model_id() == old.model_id() and held["v2"].model_id() == new.model_id()
    assert load_model(out).config.decoder_extra_blocks == (1, 1, 0)
    capsys.readouterr()
    assert main([*args, "-f", "--keep-variant", "v1"]) == 1
    assert "--keep-variant v1: the source file already holds a variant v1" in (
        capsys.readouterr().err
    )


def test_a_variant_whose_shared_weights_are_not_stored_exactly_is_refused(tmp_path):
    old = _model()  # fp32 weights: halved on saving, so the variant's id could not be reproduced
    new = refined_model(old, (1, 0, 0))
    with pytest.raises(ValueError, match="variant 'v' does not survive storage"):
        save_model(new, tmp_path / "x.pt", variants={"v": old})
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind
    save_model(new, tmp_path / "x.pt", half=False, variants={"v": old})  # fp32: exact
    assert load_model(tmp_path / "x.pt", variant="v").model_id() == old.model_id()


def test_grid_seams_tool(tmp_path, monkeypatch, capsys):
    """tools/grid_seams.py on a one-preset registry: one row per image, a summary per preset."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grid_seams", root / "tools" / "grid_seams.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "tiny.pt"
    save_model(_model(), path)
    monkeypatch.setattr(presets, "PRESETS", (Preset("tiny", str(path), 1, "tiny", 0.5),))
    monkeypatch.setattr(presets, "RETIRED", ())
    monkeypatch.setattr(presets, "DEFAULT_PRESET", "tiny")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_images(2)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "seams.json"
    assert tool.main([str(folder), "--presets", "tiny", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["image"] for r in got["rows"]] == ["0.png", "1.png"]
    assert all(r["seams"] > 0 and r["jpeg_bytes"] <= r["bytes"] or r["jpeg_quality"] == 1
               for r in got["rows"])  # fmt: skip
    s = got["summary"]["tiny"]
    assert s["model_id"] == load_model(path).model_id().hex()
    assert s["mean_seams"] == pytest.approx(np.mean([r["seams"] for r in got["rows"]]))
    assert "tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--perceptual: no perceptual decoder in tiny"):
        tool.main([str(folder), "--presets", "tiny", "--out", str(out), "--perceptual"])
    m = load_model(path)
    m.perceptual_decoder = refined_model(m, (0, 0, 0)).decoder  # a copy: decodes as the MSE one
    save_model(m, path)
    assert tool.main([str(folder), "--out", str(out), "--perceptual", "--no-jpeg"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["perceptual_seams"] == pytest.approx(r["seams"]) for r in rows)
    assert all(r["perceptual_periodic"] == pytest.approx(r["periodic"]) for r in rows)
    assert set(rows[0]["periodic"]) == {"2", "4", "8", "16"}
    assert json.loads(out.read_text())["summary"]["tiny"]["geomean_periodic"]["16"] > 0
    assert "perceptual PSNR / seams" in capsys.readouterr().out


def _gpu_train_tool():
    """tools/gpu_train.py as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_train", root / "tools" / "gpu_train.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    finally:
        sys.path.remove(str(root / "tools"))
    return tool


def _tiny_pack(tool, tmp_path):
    """A pack (``tools/gpu_train.py pack``) of 10 small photos; its path."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(_images(10)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(photos / f"{i:02d}.png")
    pack = tmp_path / "pack.tar"
    tool.pack(str(photos), str(pack))
    return pack


def test_gpu_train_refine_runs_on_the_cpu(tmp_path):
    """tools/gpu_train.py refine (the one-call GPU script), dry-run on the CPU from a tiny pack."""
    tool = _gpu_train_tool()
    pack = _tiny_pack(tool, tmp_path)
    src = tmp_path / "src.pt"
    save_model(_model(), src)
    out = tmp_path / "out"
    tool.main(["refine", "--pack", str(pack), "--model", str(src), "--out", str(out),
               "--device", "cpu", "--minutes", "0.02", "--crop", "32", "--batch", "2",
               "--extra-blocks", "1,0,0", "--keep-variant", "v1"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["device"] == "cpu"
        and summary["model_id"] == load_model(out / "model.pt").model_id().hex()
    )
    assert load_model(out / "model.pt", variant="v1").model_id() == load_model(src).model_id()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "end" and "wall_s" in rows[-1]


def test_ctrl_c_saves_the_checkpoint(tmp_path, monkeypatch):
    from pqmim_kernels.models import refine

    real, calls = refine._windows, []

    def windows(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(refine, "_windows", windows)
    cfg = RefineConfig(steps=10, batch_size=1, crop=32, save_every=100)
    with pytest.raises(KeyboardInterrupt):
        refine_decoder(_model(), _images(2), [], cfg, tmp_path, log=lambda s: None)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
