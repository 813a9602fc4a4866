"""Regenerate the golden .pqm files (md5 of the bytes) -- only on purpose, when the bitstream
format or the bundled model changes:

    .venv/bin/python tests/golden/make_golden.py            # rewrite tests/golden/golden.json
    .venv/bin/python tests/golden/make_golden.py --model    # also re-create tiny_model.pt

Cases: the container alone on fixed integer CDFs (platform independent), a tiny stored model on
three synthetic images, and the bundled default model on the bundled sample image. The model
cases depend on float results of the CPU path (conv + transformer); they are pinned for the CPU
backend of this repository's supported torch versions.
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
from pqmim_kernels.models import (  # noqa: E402
    PQMIM,
    PQMIMConfig,
    compress_image,
    decompress_image,
    load_model,
    save_model,
)

TINY_MODEL = HERE / "tiny_model.pt"
GOLDEN = HERE / "golden.json"
SAMPLE = HERE.parents[1] / "pqmim_kernels" / "data" / "sample.png"
SIZES = [(1, 1), (17, 33), (64, 80)]


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
    torch.manual_seed(0)
    cfg = PQMIMConfig(
        channels=(8, 8, 8, 8),
        latent_dim=8,
        num_subspaces=2,
        codebook_size=16,
        mim_width=16,
        mim_depth=1,
        mim_heads=2,
        stages=6,
    )
    model = PQMIM(cfg).train()
    with torch.no_grad():
        x = torch.from_numpy(synthetic_image(64, 64)).permute(2, 0, 1)[None].float() / 255
        model.quantize(model.encode_latent(x.expand(4, 3, 64, 64)))
    save_model(model.eval(), TINY_MODEL)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def compute() -> dict:
    out = {"container": md5(container_bytes())}
    tiny = load_model(str(TINY_MODEL))
    for h, w in SIZES:
        data = compress_image(synthetic_image(h, w), tiny)
        out[f"tiny_{h}x{w}"] = md5(data)
        out[f"tiny_{h}x{w}_decoded"] = md5(decompress_image(data, tiny).tobytes())
    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import DEFAULT_MODEL_PATH

    if DEFAULT_MODEL_PATH.is_file():
        data = compress_image(read_image(SAMPLE), load_model("default"))
        out["default_sample"] = md5(data)
        out["default_sample_bytes"] = len(data)
    return out


if __name__ == "__main__":
    if "--model" in sys.argv or not TINY_MODEL.is_file():
        make_tiny_model()
    result = compute()
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
