"""The preset registry: the bundled PQ-MIM models, by name and quality level, in one place.

PQ-MIM trains one model per rate point (PQMIM.md §7: the number of sub-spaces M and codebook
size K set the rate), so "quality" means "which bundled model". :data:`PRESETS` lists them;
everything else asks this module:

- ``load_model(NAME)`` (:mod:`pqmim_kernels.models`) loads a preset by name;
- ``pqmim compress --quality Q`` picks the preset of quality Q (1 = smallest files), and
  ``--max-bytes B`` without ``--quality`` searches every preset
  (:func:`pqmim_kernels.models.compress_to_fit`: the rule is written there);
- ``compress_image(img)`` / ``decompress_image(data)`` without a model use
  :data:`DEFAULT_PRESET`, and ``decompress_image`` picks the preset whose model id (or one of
  its aliases, ``PQMIM.reads``) the file's header names;
- ``pqmim eval --codecs pqmim`` sweeps every preset, ``pqmim@NAME`` one.

Adding a model: put its file (written by ``save_model``, fp16) under ``pqmim_kernels/data/`` and
add a :class:`Preset` to :data:`PRESETS`; qualities are 1, 2, 3, ... with no gaps, in the order
of the nominal bpp. :func:`registry` checks that.

Retiring a model: a file written by a bundled model must decode forever, so a model that a
better one replaces moves to :data:`RETIRED` (quality 0) instead of leaving: it no longer
compresses (not in :func:`registry`, ``--quality``, ``--max-bytes`` or the eval sweep), but
``decompress_image`` still finds it by the model id of its files and ``load_model(NAME)``
still loads it.

This module imports no torch and reads no model file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "DEFAULT_PRESET",
    "PRESETS",
    "Preset",
    "RETIRED",
    "by_quality",
    "default",
    "every",
    "find",
    "get",
    "names",
    "qualities",
    "registry",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One bundled model.

    ``name``: what ``load_model`` and ``pqmim@NAME`` take (lower-case letters, digits, ``-``,
    ``_``). ``file``: the model file, relative to :data:`DATA_DIR` (an absolute path is taken
    as it is: tests build registries in temporary folders). ``quality``: 1 = smallest files,
    then 2, 3, ... ``description``: one line for listings. ``nominal_bpp``: mean bits per pixel
    (whole files, all stages) on Kodak, as measured by ``pqmim eval``: a guide, not a promise
    (bpp depends on the image).
    """

    name: str
    file: str
    quality: int
    description: str
    nominal_bpp: float
    variant: str = ""

    @property
    def path(self) -> Path:
        """Where the model file is."""
        return DATA_DIR / self.file

    def label(self) -> str:
        """``"default (quality 1, ~0.22 bpp)"``: for messages."""
        if self.quality == 0:
            return f"{self.name} (retired: decodes only, ~{self.nominal_bpp:.2g} bpp)"
        return f"{self.name} (quality {self.quality}, ~{self.nominal_bpp:.2g} bpp)"


# Ordered by quality. Nominal bpp: Kodak, all stages, nearest codewords (results/kodak).
# low/medium/high: the PQ-VAE of the first bundled model fine-tuned for 25-30 CPU-minutes with
# a new product quantizer (pqmim train --warm-start, results/training/README.md), each with its
# own entropy model; medium's and high's decoders then refined for 75 CPU-minutes on their fixed
# codes, grown by residual blocks (pqmim refine-decoder): same codes and bits, new model ids.
PRESETS: tuple[Preset, ...] = (
    Preset(
        name="low",
        file="low_model.pt",
        quality=1,
        description="PQ-VAE widths 32-128, M=2 sub-spaces of K=256 codewords, 10 stages",
        nominal_bpp=0.041,
    ),
    Preset(
        name="medium",
        file="medium_model.pt",
        quality=2,
        description="PQ-VAE widths 32-128, M=4 sub-spaces of K=256 codewords, 10 stages, "
        "refined decoder (+2/2/1 residual blocks at strides 16/8/4)",
        nominal_bpp=0.090,
    ),
    Preset(
        name="high",
        file="high_model.pt",
        quality=3,
        description="PQ-VAE widths 32-128, M=16 sub-spaces of K=256 codewords, 10 stages, "
        "refined decoder (+2/2/1 residual blocks at strides 16/8/4)",
        nominal_bpp=0.347,
    ),
)
# Models that no longer compress but still decode the files they wrote (quality 0).
RETIRED: tuple[Preset, ...] = (
    # The first bundled model (until 2026-12): "medium" beats it on held-out photos at half
    # the rate (22.50 vs 21.88 dB), so it only decodes now; load_model("default") loads it.
    Preset(
        name="default",
        file="default_model.pt",
        quality=0,
        description="PQ-VAE widths 32-128, M=8 sub-spaces of K=256 codewords, 10 stages "
        "(the first bundled model, with a perceptual decoder)",
        nominal_bpp=0.168,
    ),
    # medium and high before their decoders were refined (2026-12-02, same codes and bits):
    # variants stored in the refined models' files, so their files still decode exactly.
    Preset(
        name="medium-v1",
        file="medium_model.pt",
        quality=0,
        description="medium with its first decoder (before pqmim refine-decoder)",
        nominal_bpp=0.090,
        variant="medium-v1",
    ),
    Preset(
        name="high-v1",
        file="high_model.pt",
        quality=0,
        description="high with its first decoder (before pqmim refine-decoder)",
        nominal_bpp=0.347,
        variant="high-v1",
    ),
)
# The preset used when none is chosen (compress_image/decompress_image without a model,
# pqmim compress without --quality or --max-bytes).
DEFAULT_PRESET = "medium"


def registry() -> tuple[Preset, ...]:
    """:data:`PRESETS` sorted by quality, after checking it is consistent.

    Raises ``RuntimeError`` naming the problem if the registry is empty, a name is malformed
    or repeated, the qualities are not 1, 2, ..., n, the nominal bpp does not grow with the
    quality, or :data:`DEFAULT_PRESET` is not one of the names (a broken registry is a bug of
    this package, not of the caller).
    """
    presets = tuple(sorted(PRESETS, key=lambda p: p.quality))
    if not presets:
        raise RuntimeError("preset registry: no presets")
    seen: set[str] = set()
    for p in presets:
        if not isinstance(p.name, str) or not _NAME.fullmatch(p.name):
            raise RuntimeError(
                f"preset registry: name {p.name!r} must be lower-case letters, digits, - or _"
            )
        if p.name in seen:
            raise RuntimeError(f"preset registry: name {p.name!r} is used twice")
        seen.add(p.name)
        if not p.nominal_bpp > 0:
            raise RuntimeError(f"preset registry: {p.name!r} has nominal_bpp {p.nominal_bpp}")
    got = [p.quality for p in presets]
    if got != list(range(1, len(presets) + 1)):
        raise RuntimeError(f"preset registry: qualities must be 1..{len(presets)}, got {got}")
    for lo, hi in zip(presets, presets[1:]):
        if not hi.nominal_bpp > lo.nominal_bpp:
            raise RuntimeError(
                f"preset registry: quality {hi.quality} ({hi.name!r}, {hi.nominal_bpp} bpp) "
                f"must make larger files than quality {lo.quality} ({lo.name!r}, "
                f"{lo.nominal_bpp} bpp)"
            )
    if DEFAULT_PRESET not in seen:
        raise RuntimeError(
            f"preset registry: the default preset {DEFAULT_PRESET!r} is not one of "
            f"{', '.join(p.name for p in presets)}"
        )
    for p in RETIRED:
        if p.name in seen or not _NAME.fullmatch(p.name):
            raise RuntimeError(f"preset registry: retired name {p.name!r} is malformed or used")
        if p.quality != 0:
            raise RuntimeError(f"preset registry: retired {p.name!r} must have quality 0")
        seen.add(p.name)
    return presets


def every() -> tuple[Preset, ...]:
    """Every bundled model: the :func:`registry` (by quality), then :data:`RETIRED`."""
    return registry() + tuple(RETIRED)


def names() -> tuple[str, ...]:
    """Preset names, by quality (smallest files first)."""
    return tuple(p.name for p in registry())


def qualities() -> tuple[int, ...]:
    """The quality levels there are: ``(1, ..., n)``."""
    return tuple(p.quality for p in registry())


def find(name: str) -> Preset | None:
    """The preset called ``name`` (retired ones too), or None."""
    return next((p for p in every() if p.name == name), None)


def get(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the names if there is none."""
    preset = find(name)
    if preset is None:
        raise ValueError(f"no preset named {name!r}; presets: {_listing()}")
    return preset


def by_quality(quality: int) -> Preset:
    """The preset of quality level ``quality``; ``ValueError`` listing the levels if none."""
    for p in registry():
        if p.quality == quality:
            return p
    raise ValueError(f"no preset of quality {quality!r}; available qualities: {_listing()}")


def default() -> Preset:
    """The :data:`DEFAULT_PRESET`."""
    return get(DEFAULT_PRESET)


def _listing() -> str:
    return ", ".join(p.label() for p in registry())
