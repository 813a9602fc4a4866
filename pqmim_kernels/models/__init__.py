"""PQ-MIM models: the codec, its configuration, saving/loading and the bundled default.

- :class:`PQMIM` (``forward`` / ``compress`` / ``decompress``) and :class:`PQMIMConfig`.
- :func:`load_model` (``"default"`` = the weights bundled in ``pqmim_kernels/data``, or a path),
  :func:`save_model`.
- :func:`compress_image` / :func:`decompress_image`: uint8 HxWx3 arrays <-> ``.pqm`` bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import torch

from pqmim_kernels.models.codec import PQMIM
from pqmim_kernels.models.config import PQMIMConfig

__all__ = [
    "DEFAULT_MODEL_PATH",
    "PQMIM",
    "PQMIMConfig",
    "compress_image",
    "decompress_image",
    "load_model",
    "save_model",
]

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "data" / "default_model.pt"
_FILE_KIND = "pqmim-model"
# 2: entropy model v2 and its integer export (.pqm format 3). Version-1 files hold the first
# entropy model, which this release cannot code with (their PQ-VAE can be reused: train with
# ``--init-from``).
_FILE_VERSION = 2


def save_model(model: PQMIM, path: str | os.PathLike, *, half: bool = True, extra=None) -> None:
    """Write ``model`` (config + state dict) to ``path``.

    ``half``: store floating tensors as float16 where that is finite (halves the file; the model
    id is computed after loading, so encoder and decoder always agree). ``extra``: a small dict
    of metadata (training steps, ...).
    """
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if half and t.is_floating_point() and torch.isfinite(t.half()).all():
            t = t.half()
        state[name] = t.clone()
    cfg = dataclasses.asdict(model.config)
    cfg["channels"] = list(cfg["channels"])
    blob = {
        "kind": _FILE_KIND,
        "version": _FILE_VERSION,
        "config": cfg,
        "state_dict": state,
        "extra": extra or {},
    }
    int_state = model.int_state()
    if int_state is not None:
        blob["int_entropy_model"] = {"tensors": int_state[0], "meta": int_state[1]}
    torch.save(blob, str(path))


def load_model(name_or_path: str = "default", device: str = "cpu") -> PQMIM:
    """Load a PQ-MIM model in eval mode, floats in fp32.

    ``name_or_path``: ``"default"`` (the bundled weights) or the path of a file written by
    :func:`save_model` / ``pqmim train``. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a file that is not a PQ-MIM model.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_model: expected a name or path, got {type(name_or_path).__name__}")
    path = DEFAULT_MODEL_PATH if str(name_or_path) == "default" else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"load_model: no model file at {path}")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"load_model: {path} is not a PQ-MIM model file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("kind") != _FILE_KIND:
        raise ValueError(f"load_model: {path} is not a PQ-MIM model file")
    version = blob.get("version")
    if version != _FILE_VERSION:
        raise ValueError(
            f"load_model: {path} is a model file of version {version}; this release reads "
            f"version {_FILE_VERSION} (entropy model v2, .pqm format 3). A version-1 file's "
            "PQ-VAE can be reused: pqmim train --init-from FILE trains a new entropy model for it"
        )
    model = PQMIM(PQMIMConfig.from_dict(blob["config"]))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()}
    model.load_state_dict(state)
    if "int_entropy_model" in blob:
        im = blob["int_entropy_model"]
        model.set_int_entropy_model(im["tensors"], im["meta"])
    model.training_info = blob.get("extra", {})
    return model.to(device).eval()


@functools.cache
def _default_model() -> PQMIM:
    return load_model("default")


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {img.shape}")
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:
        img = img.copy()  # torch.from_numpy warns on read-only arrays (e.g. from Pillow)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def compress_image(
    img: np.ndarray,
    model: PQMIM | None = None,
    *,
    stages: int | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """uint8 (H, W, 3) RGB -> ``.pqm`` bytes (``model=None``: the bundled default, cached).

    ``stages``: send only the first N coding stages (default: all); see :meth:`PQMIM.compress`.
    ``max_bytes``: instead, send the most stages whose whole file fits in this many bytes
    (PQMIM.md §7: a byte budget picks the stop stage; the decoder fills the rest). Raises
    ``ValueError`` if even the first stage does not fit.
    """
    x = _as_tensor(img)
    model = model or _default_model()
    if max_bytes is None:
        return model.compress(x, stages=stages)
    if stages is not None:
        raise ValueError("compress_image: give stages or max_bytes, not both")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"compress_image: max_bytes must be a positive int, got {max_bytes!r}")
    # File size grows with the stages sent: binary search for the last stage that fits.
    lo, hi, best = 1, model.config.stages, None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = model.compress(x, stages=mid)
        if len(data) <= max_bytes:
            best, lo = data, mid + 1
        else:
            hi = mid - 1
            smallest = len(data)
    if best is None:
        raise ValueError(
            f"compress_image: even one coding stage needs {smallest} bytes, over max_bytes="
            f"{max_bytes}"
        )
    return best


def decompress_image(data: bytes, model: PQMIM | None = None) -> np.ndarray:
    """``.pqm`` bytes -> uint8 (H, W, 3) RGB (``model=None``: the bundled default, cached)."""
    x = (model or _default_model()).decompress(data)
    return (x[0].permute(1, 2, 0).cpu() * 255.0).round().to(torch.uint8).numpy()
