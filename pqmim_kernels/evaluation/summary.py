"""From per-image records to curves: per-setting means, BD metrics against the anchor, and the
JPEG consistency check against the published Pillow JPEG curve.

A curve point is the *mean* bpp and the *mean* PSNR (and MS-SSIM) over the images at one
setting, as learned-compression papers report. PCHIP interpolation (the default BD method and
the JPEG check) needs scipy; :mod:`.requirements` says so before any work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .bd import bd_psnr, bd_rate, interpolate_psnr
from .codecs import Codec
from .metrics import ms_ssim_db
from .reference import reference_curve

JPEG_CHECK_TOLERANCE_DB = 0.3


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if len(vals) == len(values) and vals else None


def curve_points(records: Sequence[dict], codec: Codec) -> list[dict[str, Any]]:
    """Mean bpp / PSNR / MS-SSIM / times per setting of ``codec``, sorted by mean bpp."""
    points = []
    for setting in codec.settings:
        rows = [r for r in records if r["codec"] == codec.name and r["setting"] == setting]
        if not rows:
            continue
        msssim = _mean([r["ms_ssim"] for r in rows])
        points.append(
            {
                "setting": setting,
                "n_images": len(rows),
                "bpp": _mean([r["bpp"] for r in rows]),
                "psnr": _mean([r["psnr"] for r in rows]),
                "ms_ssim": msssim,
                "ms_ssim_db": ms_ssim_db(msssim) if msssim is not None else None,
                "encode_s": _mean([r["encode_s"] for r in rows]),
                "decode_s": _mean([r["decode_s"] for r in rows]),
            }
        )
    return sorted(points, key=lambda p: p["bpp"])


def _finite_curve(bpp: Sequence, quality: Sequence) -> tuple[list, list]:
    pairs = [(b, q) for b, q in zip(bpp, quality) if q is not None and math.isfinite(q) and b > 0]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def pareto_front(bpp: Sequence, quality: Sequence) -> tuple[list, list]:
    """The points of a curve that no other point beats: sorted by bpp, each kept only if its
    quality is above that of every point of lower (or equal) bpp. A sweep over several models,
    stage counts or lambdas is a cloud of points; its front is the operational RD curve (the
    best setting for each rate), and what BD metrics and plots use. A monotone curve is its
    own front."""
    out_b: list = []
    out_q: list = []
    for b, q in sorted(zip(bpp, quality), key=lambda p: (p[0], -p[1])):
        if not out_q or q > out_q[-1]:
            if out_b and out_b[-1] == b:  # same rate, better quality: replaces it
                out_b.pop()
                out_q.pop()
            out_b.append(b)
            out_q.append(q)
    return out_b, out_q


def _bd_entry(anchor: dict, test: dict, method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fn, metric in (
        ("bd_rate_pct", bd_rate, "psnr"),
        ("bd_psnr_db", bd_psnr, "psnr"),
        ("bd_rate_msssim_pct", bd_rate, "ms_ssim_db"),
    ):
        if test.get(metric) is None or anchor.get(metric) is None:
            out[key] = None
            continue
        ar, aq = pareto_front(*_finite_curve(anchor["bpp"], anchor[metric]))
        tr, tq = pareto_front(*_finite_curve(test["bpp"], test[metric]))
        try:
            out[key] = fn(ar, aq, tr, tq, method=method)
        except ValueError as exc:
            out[key] = None
            out.setdefault("notes", []).append(f"{key}: {exc}")
    return out


def jpeg_consistency(ours: dict, published: dict, tol: float = JPEG_CHECK_TOLERANCE_DB) -> dict:
    """Compare our JPEG curve with the published one at the published rates.

    Our PSNR at each published bpp comes from PCHIP interpolation over log10(bpp) of our curve
    (published points outside our rate range are reported but not judged).
    """
    rows = []
    for b, p in zip(published["bpp"], published["psnr"]):
        try:
            mine = interpolate_psnr(ours["bpp"], ours["psnr"], b)
        except ValueError:
            rows.append({"bpp": b, "published_psnr": p, "our_psnr": None, "diff_db": None})
            continue
        rows.append({"bpp": b, "published_psnr": p, "our_psnr": mine, "diff_db": mine - p})
    diffs = [abs(r["diff_db"]) for r in rows if r["diff_db"] is not None]
    return {
        "reference": published["name"],
        "tolerance_db": tol,
        "points": rows,
        "max_abs_diff_db": max(diffs) if diffs else None,
        "consistent": bool(diffs) and max(diffs) <= tol,
    }


def summarize(
    records: Sequence[dict],
    codecs: Sequence[Codec],
    references: Sequence[dict] = (),
    anchor: str = "jpeg",
    bd_method: str = "pchip",
) -> dict[str, Any]:
    """Curves per codec, BD metrics of every curve against ``anchor``, and the JPEG check.

    ``codecs``: anything with ``name``, ``settings`` and ``describe()`` (adapters, or
    :class:`~pqmim_kernels.evaluation.merge.RecordedCodec` for merged curves).
    """
    curves: dict[str, dict] = {}
    for codec in codecs:
        pts = curve_points(records, codec)
        curves[codec.name] = {
            **codec.describe(),
            "published": False,
            "points": pts,
            "bpp": [p["bpp"] for p in pts],
            "psnr": [p["psnr"] for p in pts],
            "ms_ssim_db": [p["ms_ssim_db"] for p in pts]
            if all(p["ms_ssim_db"] is not None for p in pts)
            else None,
        }
    refs = {r["name"]: r for r in references}
    all_curves = {**curves, **refs}
    bd: dict[str, Any] = {}
    bd_note = None
    if anchor not in all_curves:
        bd_note = f"anchor {anchor!r} was not evaluated; BD metrics skipped"
    else:
        for name, curve in all_curves.items():
            if name != anchor:
                bd[name] = _bd_entry(all_curves[anchor], curve, bd_method)
    check = None
    if "jpeg" in curves and len(curves["jpeg"]["bpp"]) >= 2:
        check = jpeg_consistency(curves["jpeg"], reference_curve("jpeg-published"))
    return {
        "codecs": curves,
        "references": refs,
        "anchor": anchor,
        "bd_method": bd_method,
        "bd": bd,
        "bd_note": bd_note,
        "jpeg_check": check,
    }
