"""The images of an evaluation: which files of a folder count, and reading them as 8-bit RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def list_images(images_dir: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files directly inside ``images_dir`` (by extension), sorted by name.

    Raises ``FileNotFoundError`` if the folder does not exist and ``ValueError`` if it holds no
    image or ``limit`` is not positive.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images directory not found: {root}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    files = sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit is not None else files


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` ``uint8`` RGB array (alpha dropped, grey expanded).

    Raises ``ValueError`` naming the file if it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    # A writable copy: torch.from_numpy (PQ-MIM adapter) warns on Pillow's read-only buffers.
    return np.array(rgb)
