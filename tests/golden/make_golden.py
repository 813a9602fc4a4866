"""Regenerate the golden files -- only on purpose (a deliberate format or bundled-model change):

    .venv/bin/python tests/golden/make_golden.py            # rewrite every case's files
    .venv/bin/python tests/golden/make_golden.py --model    # also re-create tiny_model.pt
    .venv/bin/python tests/golden/make_golden.py --new      # only cases golden.json lacks
                                                            # (a newly bundled preset)
    .venv/bin/python tests/golden/make_golden.py --legacy high_sample,high-v1_sample
        # a preset's model was replaced by one that reads its files (pqmim refine-encoder: the
        # old id is an alias): keep those cases' files as legacy cases, rewrite only them

Cases, each stored as ``<name>.pqm`` (the file), ``<name>.codes.npy`` (its codes, uint16
(h, w, M)) and ``<name>.png`` (its decoded image), with sizes and md5s in ``golden.json``:

- ``container``: fixed integer CDFs through the header and the coder (no model; md5 only);
- ``tiny_{h}x{w}``: a tiny stored model (random weights, integer entropy model exported from
  them) on synthetic images;
- ``<preset>_sample``: each bundled preset model (``default_sample``: the default) on the
  bundled sample image;
- legacy cases (``golden.json["legacy"]``, files ``<case>.<model id>.*``): files written by a
  model that is gone but whose id a preset's model lists as an alias; they must decode with that
  preset to their codes, and its entropy model must still code those codes to their payload.

What is pinned, and why (docs/PQM_FORMAT.md, "Determinism"): codes <-> ``.pqm`` bytes are exact
on every machine (the integer entropy model), so the tests require ``compress_codes(codes) ==
file`` and ``decompress_codes(file) == codes`` bit for bit. The float parts are not: image ->
codes (conv encoder + argmin, near ties may flip) is not pinned at all, and codes -> image (conv
decoder) is compared with the stored image within a tolerance.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from pqmim_kernels.coding import RansEncoder, quantize_probs  # noqa: E402
from pqmim_kernels.coding import pqm_format as fmt  # noqa: E402
from pqmim_kernels.models import PQMIM, PQMIMConfig, load_model, save_model  # noqa: E402
from pqmim_kernels.models.mim import stage_grid  # noqa: E402

TINY_MODEL = HERE / "tiny_model.pt"
GOLDEN = HERE / "golden.json"
SAMPLE = HERE.parents[1] / "pqmim_kernels" / "data" / "sample.png"
SIZES = [(1, 1), (17, 33), (64, 80)]
TINY_CONFIG = PQMIMConfig(
    channels=(8, 8, 8, 8),
    latent_dim=8,
    num_subspaces=2,
    codebook_size=16,
    mim_width=16,
    mim_depth=1,
    mim_heads=2,
    mim_radius=2,
    stages=6,
)


def synthetic_image(h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3) from integer arithmetic only (identical everywhere)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (x * 7 + y * 3) % 256
    g = (x * x + 5 * y) % 256
    b = ((x ^ y) * 11) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def container_bytes() -> bytes:
    """A .pqm built from fixed integer inputs: exercises header + coder, no floats."""
    k = 16
    probs = np.arange(1, k + 1, dtype=np.float32)[None].repeat(40, 0)
    probs = probs / probs.sum(1, keepdims=True)
    cdfs = quantize_probs(probs)
    symbols = (np.arange(40, dtype=np.int64) * 5) % k
    enc = RansEncoder()
    enc.encode_cdfs(symbols, cdfs)
    hdr = fmt.PqmHeader(b"\xab\xcd", 300, 17, 10, fmt.code_check(symbols))
    return fmt.pack(hdr, enc.finish())


def make_tiny_model() -> None:
    """A tiny model with random weights; its entropy model calibrated on random codes and
    exported (the stored integers are what every machine decodes with)."""
    torch.manual_seed(0)
    model = PQMIM(TINY_CONFIG).train()
    with torch.no_grad():
        x = torch.from_numpy(synthetic_image(64, 64)).permute(2, 0, 1)[None].float() / 255
        model.quantize(model.encode_latent(x.expand(4, 3, 64, 64)))
        em = model.entropy_model
        codes = torch.randint(0, TINY_CONFIG.codebook_size, (4, 8, 8, TINY_CONFIG.num_subspaces))
        em.calibrate([(codes, stage_grid(8, 8, TINY_CONFIG.stages))])
    model.eval().export_entropy_model()
    save_model(model, TINY_MODEL)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def cases() -> list[tuple[str, str, np.ndarray]]:
    """``(name, model, image)`` of every model case: ``model`` is what ``load_model`` takes, the
    tiny model's path or a bundled preset's name (each preset whose file is there; a retired
    variant preset loads its variant of the file)."""
    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import presets

    out = [(f"tiny_{h}x{w}", str(TINY_MODEL), synthetic_image(h, w)) for h, w in SIZES]
    for preset in presets.every():
        if preset.path.is_file():
            out.append((f"{preset.name}_sample", preset.name, read_image(SAMPLE)))
    return out


def write_case(name: str, model: PQMIM, img: np.ndarray) -> dict:
    from PIL import Image

    from pqmim_kernels.models import compress_image, decompress_image

    data = compress_image(img, model)
    codes, size = model.decompress_codes(data)
    decoded = decompress_image(data, model)
    (HERE / f"{name}.pqm").write_bytes(data)
    np.save(HERE / f"{name}.codes.npy", codes[0].cpu().numpy().astype(np.uint16))
    Image.fromarray(decoded, "RGB").save(HERE / f"{name}.png")
    return {"size": list(size), "bytes": len(data), "md5": md5(data)}


def compute(keep: dict | None = None) -> dict:
    """Golden entries of every case; with ``keep`` (a golden.json dict), the cases it already
    has keep their entry and their files (only new cases are written)."""
    out = {"container": md5(container_bytes()), "cases": {}}
    for name, path, img in cases():
        if keep is not None and name in keep["cases"]:
            out["cases"][name] = keep["cases"][name]
        else:
            out["cases"][name] = write_case(name, load_model(path), img)
    return out


def make_legacy(golden: dict, names: list[str]) -> dict:
    """Keep the files of cases ``names`` as legacy cases (renamed ``<case>.<model id>.*``, their
    entries moved to ``golden["legacy"]``) and drop them from ``golden["cases"]`` so that
    :func:`compute` writes them anew. Each case's preset must read the old file's model id."""
    from pqmim_kernels.models import presets

    legacy = dict(golden.get("legacy", {}))
    for name in names:
        entry = golden["cases"].pop(name)
        data = (HERE / f"{name}.pqm").read_bytes()
        old_id = fmt.unpack(data)[0].model_id.hex()
        preset = dict((n, m) for n, m, _ in cases())[name]
        if presets.find(preset) is None or not load_model(preset).reads(bytes.fromhex(old_id)):
            raise SystemExit(f"make_golden: {preset} does not read model {old_id} ({name})")
        for ext in (".pqm", ".codes.npy", ".png"):
            (HERE / f"{name}{ext}").rename(HERE / f"{name}.{old_id}{ext}")
        legacy[f"{name}.{old_id}"] = {**entry, "preset": preset, "model_id": old_id}
    golden["legacy"] = legacy
    return golden


if __name__ == "__main__":
    if "--model" in sys.argv or not TINY_MODEL.is_file():
        make_tiny_model()
    keep = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else None
    legacy = (keep or {}).get("legacy", {})
    if "--legacy" in sys.argv:
        keep = make_legacy(keep, sys.argv[sys.argv.index("--legacy") + 1].split(","))
        legacy = keep["legacy"]
    elif "--new" not in sys.argv:
        keep = None
    result = compute(keep)
    if legacy:
        result["legacy"] = legacy
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
