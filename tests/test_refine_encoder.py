"""Encoder refinement (``pqmim refine-encoder``, :func:`refine_encoder`) and the model-id
aliases that let the refined model read its predecessor's files (``PQMIM.add_alias``,
``PQMIM.reads``, stored by ``save_model``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny import TINY, make_coding_ready
from test_refine import _images, _photo_folder

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import (
    PQMIM,
    compress_image,
    decompress_image,
    load_model,
    model_for_file,
    presets,
    save_model,
)
from pqmim_kernels.models.latent_opt import soft_bits
from pqmim_kernels.models.presets import Preset
from pqmim_kernels.models.refine import (
    RefineConfig,
    refine_decoder,
    refine_encoder,
    refined_encoder_model,
    refined_model,
)
from pqmim_kernels.models.train import validation_psnr


def _stored(tmp_path, seed: int = 0) -> PQMIM:
    """A coding-ready tiny model as a model file stores it (fp16 weights)."""
    torch.manual_seed(seed)
    m = PQMIM(TINY).train()
    with torch.no_grad():
        m.quantize(m.encode_latent(torch.rand(4, 3, 64, 64)))
    path = tmp_path / f"m{seed}.pt"
    save_model(make_coding_ready(m.eval(), seed=seed), path)
    return load_model(path)


def _new_encoder(old: PQMIM) -> PQMIM:
    new = refined_encoder_model(old)
    with torch.no_grad():
        for p in new.encoder.parameters():  # "trained", and fp16 values as a stored model has
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    return new


def _img(seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(40, 56, 3, generator=g) * 255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- aliases
def test_a_model_with_a_new_encoder_reads_the_old_files(tmp_path):
    old = _stored(tmp_path)
    new = _new_encoder(old)
    assert new.model_id() != old.model_id() and new.aliases == (old.model_id(),)
    assert new.reads(old.model_id()) and new.reads(new.model_id()) and not old.reads(new.model_id())
    data = compress_image(_img(), old)
    assert np.array_equal(decompress_image(data, new), decompress_image(data, old))
    # its own files carry its own id, and the old model refuses them, naming both ids
    mine = compress_image(_img(), new)
    with pytest.raises(ValueError, match=f"made by model {new.model_id().hex()}, not by"):
        decompress_image(mine, old)
    other = _stored(tmp_path, seed=5)
    with pytest.raises(ValueError, match=f"which also reads {old.model_id().hex()}"):
        decompress_image(compress_image(_img(), other), new)


def test_a_refined_encoder_keeps_the_perceptual_decoder(tmp_path):
    from pqmim_kernels.models.pqvae import Decoder

    old = _stored(tmp_path)
    old.perceptual_decoder = Decoder.from_config(old.config).eval()
    new = refined_encoder_model(old)
    assert new.perceptual_decoder is not old.perceptual_decoder
    a, b = old.perceptual_decoder.state_dict(), new.perceptual_decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    data = compress_image(_img(4), old)
    got = decompress_image(data, new, decoder="perceptual")
    assert np.array_equal(got, decompress_image(data, old, decoder="perceptual"))


def test_aliases_are_stored_and_chain(tmp_path):
    old = _stored(tmp_path)
    mid = _new_encoder(old)
    path = tmp_path / "mid.pt"
    save_model(mid, path)
    mid = load_model(path)
    assert mid.aliases == (old.model_id(),)
    last = _new_encoder(mid)  # a second refinement reads both earlier models' files
    assert last.aliases == (mid.model_id(), old.model_id())
    save_model(last, tmp_path / "last.pt")
    back = load_model(tmp_path / "last.pt")
    assert back.model_id() == last.model_id() and back.aliases == last.aliases
    data = compress_image(_img(1), old)
    assert np.array_equal(decompress_image(data, back), decompress_image(data, old))
    # an unchanged copy lists no alias of itself in the file
    save_model(refined_encoder_model(old), tmp_path / "same.pt")
    assert "aliases" not in torch.load(tmp_path / "same.pt", weights_only=True)


def test_only_models_that_decode_alike_become_aliases(tmp_path):
    old = _stored(tmp_path)
    grown = refined_model(old, (1, 0, 0))
    with torch.no_grad():
        next(grown.decoder.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="different configs"):
        grown.add_alias(old)
    dec = refined_encoder_model(old)
    with torch.no_grad():
        next(dec.decoder.parameters()).add_(0.1)
    with pytest.raises(ValueError, match=r"differ in decoder\..*only the encoder may differ"):
        dec.add_alias(old)
    ent = refined_encoder_model(old)
    with torch.no_grad():
        next(ent.entropy_model.parameters()).add_(0.1)
    with pytest.raises(ValueError, match=r"differ in entropy_model\."):
        ent.add_alias(old)
    ints = refined_encoder_model(old)
    tensors, meta = ints.int_state()
    tensors = {k: v.clone() for k, v in tensors.items()}
    k = next(k for k, v in tensors.items() if v.numel())
    tensors[k].view(-1)[0] += 1
    ints.set_int_entropy_model(tensors, meta)
    with pytest.raises(ValueError, match="different integer entropy models"):
        ints.add_alias(old)
    with pytest.raises(TypeError, match="expected a PQMIM"):
        ints.add_alias("old")


def test_malformed_aliases_in_a_file_are_refused(tmp_path):
    old = _stored(tmp_path)
    path = tmp_path / "new.pt"
    save_model(_new_encoder(old), path)
    blob = torch.load(path, weights_only=True)
    for bad in (["12345"], ["zz"], "abcd", [7]):
        blob["aliases"] = bad
        torch.save(blob, path)
        with pytest.raises(ValueError, match="malformed model-id aliases: the file is damaged"):
            load_model(path)


def test_variants_keep_their_aliases(tmp_path):
    """The bundled case: a refined-decoder model with a variant, whose encoder is then refined:
    the new file's model and its variant each read the files of their predecessors."""
    first = _stored(tmp_path)
    refined = refined_model(first, (1, 0, 0))
    with torch.no_grad():
        for p in refined.decoder.parameters():
            p.copy_((p + 0.01 * torch.randn_like(p)).half().float())
    new = _new_encoder(refined)
    v1 = refined_encoder_model(first)  # the first decoder with the new encoder
    v1.encoder.load_state_dict(new.encoder.state_dict())
    path = tmp_path / "new.pt"
    save_model(new, path, variants={"v1": v1})
    monkeypatch_registry = [
        (presets, "PRESETS", (Preset("tiny", str(path), 1, "tiny", 0.5),)),
        (presets, "RETIRED", (Preset("tiny-v1", str(path), 0, "first", 0.5, variant="v1"),)),
        (presets, "DEFAULT_PRESET", "tiny"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        for obj, name, value in monkeypatch_registry:
            mp.setattr(obj, name, value)
        for writer, reader in ((first, "tiny-v1"), (refined, "tiny"), (new, "tiny")):
            data = compress_image(_img(2), writer)
            got, preset = model_for_file(data)
            assert preset.name == reader and got.reads(writer.model_id())
            assert np.array_equal(decompress_image(data), decompress_image(data, writer))
        assert load_model("tiny-v1").aliases == (first.model_id(),)


# ------------------------------------------------------------------------ refine_encoder
def test_refine_encoder_trains_the_encoder_only_and_resumes(tmp_path):
    images = _images(3)
    cfg = RefineConfig(steps=40, batch_size=2, crop=32, lr=3e-3, warmup=5, log_every=10,
                       val_every=20, save_every=10)  # fmt: skip
    # the untrained tiny decoder draws nearly the same for every code (no encoder could find
    # better ones); with its convs scaled up, what it draws depends on the codes
    model = _stored(tmp_path)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() == 4:
                p.mul_(4.0)
    save_model(model, tmp_path / "sensitive.pt")
    model = load_model(tmp_path / "sensitive.pt")
    before = validation_psnr(model, images)["psnr"]
    run = tmp_path / "run"
    refine_encoder(model, images, images, dataclasses.replace(cfg, steps=20), run, log=print)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 20
    got = refine_encoder(model, images, images, cfg, run, log=lambda s: None)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mse" in r] == [10, 20, 30, 40]
    assert sum(r["step"] == 0 for r in rows) == 1 and rows[0]["val_psnr"] == pytest.approx(before)
    after = validation_psnr(got, images)["psnr"]
    assert rows[-1]["event"] == "end" and rows[-1]["val_psnr"] == pytest.approx(after, abs=1e-4)
    assert after > before + 0.1  # the nearest codes of the new latents decode better
    a, b = model.state_dict(), got.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)
    assert got.aliases == (model.model_id(),)
    assert got.training_info["refine_encoder"]["steps_done"] == 40
    assert all(p.requires_grad for p in got.parameters())  # a normal model again
    data = compress_image(_img(3), model)
    assert np.array_equal(decompress_image(data, got), decompress_image(data, model))
    # a decoder run's folder is not resumed as an encoder run, nor the other way round
    with pytest.raises(ValueError, match="not a checkpoint of a decoder refinement"):
        refine_decoder(model, images, [], cfg, run, log=lambda s: None)
    with pytest.raises(ValueError, match="extra_blocks must be"):
        refine_encoder(model, images, [], dataclasses.replace(cfg, extra_blocks=(1, 0, 0)), run)
    with pytest.raises(ValueError, match="no training images"):
        refine_encoder(model, [], [], cfg, run)


def test_cli_refine_encoder(tmp_path, capsys):
    src = tmp_path / "src.pt"
    save_model(_stored(tmp_path), src)
    data = _photo_folder(tmp_path)
    out = tmp_path / "refined.pt"
    args = ["refine-encoder", "--model", str(src), "--data", str(data), "--out", str(out),
            "--run-dir", str(tmp_path / "run"), "--steps", "4", "--crop", "32",
            "--batch-size", "2", "--rate-weight", "0.01"]  # fmt: skip
    assert main(args) == 0
    said = capsys.readouterr().out
    old, new = load_model(src), load_model(out)
    assert f"model id {new.model_id().hex()}; also reads {old.model_id().hex()}" in said
    assert new.aliases == (old.model_id(),)
    assert new.training_info["refine_encoder"]["rate_weight"] == 0.01
    assert main(args) == 1  # the output exists
    assert "exists" in capsys.readouterr().err
    assert main([*args, "-f", "--rate-weight", "-1"]) == 1
    assert "rate_weight must be >= 0" in capsys.readouterr().err


def test_cli_refine_encoder_carries_the_source_files_variants(tmp_path):
    """A variant of the source file gets the new encoder and lists its old id: the files it
    wrote still decode from the new file, with that variant."""
    from pqmim_kernels.models import load_variants

    old = _stored(tmp_path)
    grown = refined_model(old, (1, 0, 0))
    src = tmp_path / "src.pt"
    save_model(grown, src, variants={"v1": old})
    grown = load_model(src)
    data = _photo_folder(tmp_path)
    out = tmp_path / "refined.pt"
    assert main(["refine-encoder", "--model", str(src), "--data", str(data), "--out", str(out),
                 "--run-dir", str(tmp_path / "run"), "--steps", "2", "--crop", "32",
                 "--batch-size", "2"]) == 0  # fmt: skip
    new, v1 = load_model(out), load_variants(out)["v1"]
    assert new.reads(grown.model_id()) and v1.reads(old.model_id())
    assert v1.model_id() != old.model_id()  # the new encoder
    assert torch.equal(v1.encoder.net[0].weight, new.encoder.net[0].weight)
    file = compress_image(_img(), old)
    assert np.array_equal(decompress_image(file, v1), decompress_image(file, old))


def test_soft_bits_is_the_rate_at_the_codewords_and_falls_along_its_gradient(tmp_path):
    model = _stored(tmp_path)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        codes = model.encode_codes(x)
        exact = model.dequantize(codes).permute(0, 2, 3, 1)  # every sub-vector on a codeword
        want = float(model.mim_bits(codes).sum())
    assert float(soft_bits(model, exact, codes)) == pytest.approx(want, rel=1e-4)
    y = model.encode_latent(x).detach().requires_grad_(True)
    with torch.no_grad():
        codes = model.quantize(y)[1]
    bits = soft_bits(model, y, codes)
    (grad,) = torch.autograd.grad(bits, y)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        assert soft_bits(model, y - 1e-3 * grad / grad.norm(), codes) < bits


def test_refine_encoder_with_a_rate_term(tmp_path):
    model = _stored(tmp_path)
    images = _images(3)
    cfg = RefineConfig(steps=4, batch_size=4, crop=32, lr=3e-3, warmup=1, log_every=2,
                       val_every=2, rate_weight=0.05)  # fmt: skip
    got = refine_encoder(model, images, images, cfg, tmp_path / "run", log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["val_bpp"] > 0 for r in rows if "val_psnr" in r)
    assert got.training_info["refine_encoder"]["rate_weight"] == 0.05
    with pytest.raises(ValueError, match="rate_weight must be >= 0"):
        RefineConfig(rate_weight=-1.0)


def test_golden_legacy_cases_when_a_preset_gets_a_new_encoder(tmp_path, monkeypatch):
    """``make_golden.py --legacy``: the old model's golden file is kept as a legacy case that the
    new model decodes, and the case is written anew by the new model."""
    from test_codec_golden import check_legacy, golden

    old = _stored(tmp_path)
    path = tmp_path / "tiny.pt"
    save_model(old, path)
    monkeypatch.setattr(presets, "PRESETS", (Preset("tiny", str(path), 1, "tiny", 0.5),))
    monkeypatch.setattr(presets, "RETIRED", ())
    monkeypatch.setattr(presets, "DEFAULT_PRESET", "tiny")
    folder = tmp_path / "golden"
    folder.mkdir()
    monkeypatch.setattr(golden, "HERE", folder)
    monkeypatch.setattr(golden, "SIZES", [])
    first = golden.compute()
    assert set(first["cases"]) == {"tiny_sample"}
    md5 = first["cases"]["tiny_sample"]["md5"]
    new = _new_encoder(load_model(path))
    save_model(new, path)  # the preset's file now holds the refined encoder
    keep = golden.make_legacy(first, ["tiny_sample"])
    name = f"tiny_sample.{old.model_id().hex()}"
    assert set(keep["legacy"]) == {name} and keep["legacy"][name]["preset"] == "tiny"
    again = golden.compute(keep)
    assert set(again["cases"]) == {"tiny_sample"}
    assert again["cases"]["tiny_sample"]["md5"] != md5 and keep["legacy"][name]["md5"] == md5
    check_legacy(folder, name, keep["legacy"][name])
    data = (folder / "tiny_sample.pqm").read_bytes()  # the new case is the new model's file
    assert model_for_file(data)[0].model_id() == load_model(path).model_id()
    # a preset that does not read the old id cannot take over its files
    save_model(_stored(tmp_path, seed=7), path)
    with pytest.raises(SystemExit, match="does not read model"):
        golden.make_legacy(json.loads(json.dumps(again)), ["tiny_sample"])


def test_gpu_train_refine_encoder_runs_on_the_cpu(tmp_path):
    """tools/gpu_train.py refine-encoder (the one-call GPU script), dry-run on the CPU."""
    from test_refine import _gpu_train_tool, _tiny_pack

    tool = _gpu_train_tool()
    pack = _tiny_pack(tool, tmp_path)
    src = tmp_path / "src.pt"
    save_model(_stored(tmp_path), src)
    out = tmp_path / "out"
    tool.main(["refine-encoder", "--pack", str(pack), "--model", str(src), "--out", str(out),
               "--device", "cpu", "--minutes", "0.02", "--crop", "32", "--batch", "2"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    got = load_model(out / "model.pt")
    assert summary["model_id"] == got.model_id().hex() and summary["device"] == "cpu"
    assert summary["reads"] == [load_model(src).model_id().hex()] and got.reads(got.aliases[0])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "end" and "wall_s" in rows[-1] and "val_bpp" in rows[-1]
