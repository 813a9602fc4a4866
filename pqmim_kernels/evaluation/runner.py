"""The rate-distortion evaluation behind ``pqmim eval``: the pipeline, one step per module.

:func:`.images.list_images` -> :func:`check_requirements` (optional packages, before any work)
-> :func:`.selection.build_codecs` (adapters + published curves, skipping codecs whose library
is missing) -> :func:`.sweep.run_codecs` (every image x codec x setting, in parallel over
(image, codec) jobs) -> :func:`.merge.load_previous` (``--merge``) -> :func:`.summary.summarize`
(per-setting means, BD metrics against the anchor, the JPEG consistency check) ->
:func:`.report.write_outputs` (JSON, markdown, PNG).

The names the steps had when they all lived here are still importable from this module.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .images import IMAGE_EXTENSIONS, list_images, load_rgb
from .merge import RecordedCodec, load_previous
from .report import format_summary, markdown_report, write_outputs
from .requirements import MissingDependency, needed, require
from .selection import build_codecs, parse_codec_list, parse_qualities, planned_curves
from .summary import JPEG_CHECK_TOLERANCE_DB, curve_points, jpeg_consistency, summarize
from .sweep import evaluate_image, machine_info, run_codecs

__all__ = [
    "IMAGE_EXTENSIONS",
    "JPEG_CHECK_TOLERANCE_DB",
    "MissingDependency",
    "RecordedCodec",
    "build_codecs",
    "check_requirements",
    "curve_points",
    "evaluate",
    "evaluate_image",
    "format_summary",
    "jpeg_consistency",
    "list_images",
    "load_previous",
    "load_rgb",
    "machine_info",
    "markdown_report",
    "parse_codec_list",
    "parse_qualities",
    "run_codecs",
    "summarize",
    "write_outputs",
]


def check_requirements(
    codec_names: Sequence[str],
    *,
    qualities: dict[str, list] | None = None,
    pqmim_models: Sequence[str] | None = None,
    pqmim_stages: Sequence[int] | None = None,
    anchor: str = "jpeg",
    bd_method: str = "pchip",
    plot: bool = False,
    merged: tuple[list[RecordedCodec], list[dict], dict[str, Any]] | None = None,
) -> None:
    """Raise :class:`MissingDependency` (naming the extra to install) if a package the run
    will need is missing: scipy for PCHIP (BD metrics, JPEG check), matplotlib for ``plot``.

    ``merged``: what :func:`load_previous` returned for ``--merge`` (its curves count too).
    Codec libraries are not checked here: a codec whose library is missing is skipped with a
    message by :func:`build_codecs`. Unknown codec or reference names raise ``ValueError``.
    """
    curves = planned_curves(codec_names, qualities, pqmim_models, pqmim_stages)
    if merged is not None:
        old_codecs, _, provenance = merged
        for codec in old_codecs:
            curves.setdefault(codec.name, len(codec.settings))
        for ref in provenance["references"]:
            curves.setdefault(ref["name"], len(ref["bpp"]))
    require(needed(curves, anchor, bd_method, plot))


def evaluate(
    images_dir: str | os.PathLike,
    codec_names: Sequence[str],
    *,
    qualities: dict[str, list] | None = None,
    pqmim_models: Sequence[str] | None = None,
    pqmim_api: Any = None,
    anchor: str = "jpeg",
    bd_method: str = "pchip",
    workers: int = 1,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    merge: str | os.PathLike | None = None,
    pqmim_stages: Sequence[int] | None = None,
    pqmim_device: str = "cpu",
) -> dict[str, Any]:
    """Full evaluation; returns the result dict that :func:`write_outputs` serialises.

    ``merge``: an earlier ``results.json`` on the same images whose codecs (other than the ones
    run now) join this result, e.g. to add PQ-MIM to a committed classical-codec run.
    Everything that can be checked (images readable, ``merge`` file, optional packages of the
    summary, codec names) is checked before the first image is encoded.
    """
    from .bd import METHODS

    if bd_method not in METHODS:
        raise ValueError(f"unknown BD method {bd_method!r}; choose from {', '.join(METHODS)}")
    images = list_images(images_dir, limit)
    for path in images:  # fail before any work on an unreadable file, naming it
        load_rgb(path)
    previous = None
    if merge is not None:  # a bad --merge file fails before the (long) run, not after it
        previous = load_previous(merge, images, [])
    check_requirements(
        codec_names,
        qualities=qualities,
        pqmim_models=pqmim_models,
        pqmim_stages=pqmim_stages,
        anchor=anchor,
        bd_method=bd_method,
        merged=previous,
    )
    codecs, refs, skipped = build_codecs(
        codec_names, qualities, pqmim_models, pqmim_api, log, pqmim_stages, pqmim_device
    )
    if not codecs and not refs:
        raise RuntimeError(
            "none of the requested codecs can run here: " + "; ".join(skipped.values())
        )
    t0 = time.perf_counter()
    records = run_codecs(images, codecs, workers=workers, progress=progress)
    elapsed = time.perf_counter() - t0
    merged_from = None
    all_codecs: list = list(codecs)
    if merge is not None:
        old_codecs, old_records, merged_from = load_previous(
            merge, images, [c.name for c in codecs]
        )
        all_codecs = [*old_codecs, *codecs]
        records = [*old_records, *records]
        # published curves of the earlier run stay (a ref:NAME given now replaces its namesake)
        mine = {r["name"] for r in refs}
        refs = [*(r for r in merged_from.pop("references") if r["name"] not in mine), *refs]
    result = summarize(records, all_codecs, refs, anchor=anchor, bd_method=bd_method)
    root = Path(images_dir)
    result.update(
        {
            "tool": "pqmim eval",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dataset": root.resolve().name,
            "images_dir": str(root),
            "n_images": len(images),
            "images": [p.name for p in images],
            "workers": workers,
            "wall_s": elapsed,
            "machine": machine_info(),
            "skipped": skipped,
            "merged_from": merged_from,
            "per_image": records,
        }
    )
    return result
