"""``--merge``: curves of an earlier ``results.json`` on the same images join this run's.

A merged codec is rebuilt as a :class:`RecordedCodec` (what :func:`.summary.summarize` needs,
nothing that encodes) with its per-image records, so BD metrics against the anchor and the
report treat it like a codec measured now; the result says where it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RecordedCodec:
    """A codec measured by an earlier run, rebuilt from its ``results.json`` entry (``--merge``).

    Offers what :func:`summarize` needs (``name``, ``settings``, :meth:`describe`), nothing that
    encodes.
    """

    def __init__(self, entry: dict[str, Any]) -> None:
        keys = ("name", "label", "setting_name", "settings", "params", "versions")
        self._info = {k: entry[k] for k in keys}
        self.name = entry["name"]
        self.label = entry["label"]
        self.setting_name = entry["setting_name"]
        self.settings = tuple(entry["settings"])

    def describe(self) -> dict[str, Any]:
        return dict(self._info)


def load_previous(
    path: str | os.PathLike, images: Sequence[Path], exclude: Sequence[str]
) -> tuple[list[RecordedCodec], list[dict], dict[str, Any]]:
    """Codecs, per-image records and provenance of an earlier ``results.json``.

    Codecs named in ``exclude`` (re-run now) are dropped; the earlier published reference
    curves travel in ``provenance["references"]`` (the caller keeps them). Raises
    ``ValueError`` if the file is not a ``pqmim eval`` result or was measured on other images
    than ``images``.
    """
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--merge: cannot read {path}: {exc}") from exc
    if not isinstance(old, dict) or old.get("tool") != "pqmim eval":
        raise ValueError(f"--merge: {path} is not a results.json written by pqmim eval")
    names = [p.name for p in images]
    if old["images"] != names:
        raise ValueError(
            f"--merge: {path} was measured on other images ({old['n_images']} images: "
            f"{', '.join(old['images'][:3])}, ...) than this run ({len(names)} images)"
        )
    codecs = [RecordedCodec(c) for n, c in old["codecs"].items() if n not in exclude]
    kept = {c.name for c in codecs}
    records = [r for r in old["per_image"] if r["codec"] in kept]
    provenance = {
        "path": str(path),
        "codecs": sorted(kept),
        "created": old["created"],
        "machine": old["machine"],
        "workers": old["workers"],
        "references": list(old.get("references", {}).values()),
    }
    return codecs, records, provenance
