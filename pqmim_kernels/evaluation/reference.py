"""Published reference RD curves shipped with the package (``reference_curves.json``).

They are selected with ``--codecs ref:NAME`` and are never mixed up with measured runs: every
curve carries ``published: True`` and a label saying so.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
    text = resources.files("pqmim_kernels.evaluation").joinpath("reference_curves.json")
    return json.loads(text.read_text(encoding="utf-8"))


def reference_names() -> tuple[str, ...]:
    """Names usable as ``ref:NAME``."""
    return tuple(_load()["curves"])


def reference_curve(name: str) -> dict[str, Any]:
    """The published curve ``name``: ``{"name", "label", "dataset", "bpp", "psnr", "published"}``.

    ``bpp`` and ``psnr`` are lists of floats sorted by rate.
    """
    data = _load()
    if name not in data["curves"]:
        raise ValueError(
            f"unknown reference curve {name!r}; choose from "
            + ", ".join(f"ref:{n}" for n in data["curves"])
        )
    pts = sorted(data["curves"][name]["points"])
    return {
        "name": f"ref:{name}",
        "label": data["curves"][name]["label"],
        "dataset": data["dataset"],
        "bpp": [float(p[0]) for p in pts],
        "psnr": [float(p[1]) for p in pts],
        "published": True,
    }
