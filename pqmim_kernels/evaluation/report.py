"""What a result dict becomes: ``results.json`` (strict JSON), ``results.md`` (BD table,
per-setting points, JPEG check, skipped codecs), ``rd.png`` (:mod:`.plot`) and the short summary
the CLI prints.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .requirements import PLOT_REQUIREMENT, require


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec) + unit


def markdown_report(result: dict[str, Any]) -> str:
    """The markdown table (BD summary, per-setting points, JPEG check) of a result dict."""
    lines = [
        f"# Rate-distortion evaluation: {result['dataset']} ({result['n_images']} images)",
        "",
        f"Measured {result['created']} on {result['machine']['cpu']} "
        f"({result['workers']} worker processes). Mean bpp (whole files) and mean RGB PSNR / "
        "MS-SSIM over the images per setting.",
        "",
        *(
            [
                f"Curves of {', '.join(result['merged_from']['codecs'])} come from "
                f"`{result['merged_from']['path']}` (measured {result['merged_from']['created']}).",
                "",
            ]
            if result.get("merged_from")
            else []
        ),
        f"## BD metrics against `{result['anchor']}` ({result['bd_method']}, overlapping range)",
        "",
        "| codec | BD-rate (PSNR) | BD-PSNR | BD-rate (MS-SSIM dB) | source |",
        "|---|---:|---:|---:|---|",
    ]
    labels = {**{k: v["label"] for k, v in result["codecs"].items()}}
    labels.update({k: v["label"] for k, v in result["references"].items()})
    for name, entry in result["bd"].items():
        src = "published numbers" if name in result["references"] else "measured here"
        lines.append(
            f"| {labels[name]} | {_fmt(entry['bd_rate_pct'], '+.1f', ' %')} | "
            f"{_fmt(entry['bd_psnr_db'], '+.2f', ' dB')} | "
            f"{_fmt(entry['bd_rate_msssim_pct'], '+.1f', ' %')} | {src} |"
        )
    if result.get("bd_note"):
        lines += ["", f"_{result['bd_note']}_"]
    notes = [(labels[n], note) for n, e in result["bd"].items() for note in e.get("notes", [])]
    if notes:  # why a cell is empty (one-point curve, no overlap, ...)
        lines += ["", *(f"- {label}: {note}" for label, note in notes)]
    lines += ["", "## Measured points", ""]
    for name, c in result["codecs"].items():
        params = ", ".join(
            f"{k} ({', '.join(f'{kk} {vv}' for kk, vv in v.items())})"
            if isinstance(v, dict)
            else f"{k}={v}"
            for k, v in c["params"].items()
        )
        versions = ", ".join(f"{k} {v}" for k, v in c["versions"].items())
        lines += [
            f"### {c['label']} (`{name}`)",
            "",
            f"{params}; {versions}",
            "",
            f"| {c['setting_name']} | bpp | PSNR dB | MS-SSIM | MS-SSIM dB | enc ms | dec ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in c["points"]:
            lines.append(
                f"| {p['setting']} | {_fmt(p['bpp'], '.4f')} | {_fmt(p['psnr'], '.2f')} | "
                f"{_fmt(p['ms_ssim'], '.4f')} | {_fmt(p['ms_ssim_db'], '.2f')} | "
                f"{_fmt(p['encode_s'] * 1e3, '.1f')} | {_fmt(p['decode_s'] * 1e3, '.1f')} |"
            )
        lines.append("")
    if result["references"]:
        lines += ["## Published curves (not run here)", ""]
        for r in result["references"].values():
            pts = ", ".join(f"{b:.3f}→{q:.2f}" for b, q in zip(r["bpp"], r["psnr"]))
            lines.append(f"- {r['label']} ({r['dataset']}): {pts}")
        lines.append("")
    chk = result.get("jpeg_check")
    if chk:
        lines += [
            "## JPEG consistency check",
            "",
            f"Our `jpeg` curve (PCHIP over log bpp) at the rates of `{chk['reference']}`; "
            f"tolerance {chk['tolerance_db']} dB. Meaningful on Kodak only.",
            "",
            "| bpp | published PSNR | ours | diff dB |",
            "|---:|---:|---:|---:|",
        ]
        for r in chk["points"]:
            lines.append(
                f"| {r['bpp']:.3f} | {r['published_psnr']:.2f} | {_fmt(r['our_psnr'], '.2f')} | "
                f"{_fmt(r['diff_db'], '+.2f')} |"
            )
        verdict = "consistent" if chk["consistent"] else "NOT consistent"
        lines += ["", f"Max |diff| {_fmt(chk['max_abs_diff_db'], '.2f')} dB: **{verdict}**.", ""]
    if result["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- `{k}`: {v}" for k, v in result["skipped"].items()]
        lines.append("")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become None (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike, plot: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (if ``plot``) ``rd.png``; returns the paths.

    Raises :class:`~pqmim_kernels.evaluation.requirements.MissingDependency` before writing
    anything if ``plot`` is set and matplotlib is not installed.
    """
    if plot:  # say so before writing anything
        require([PLOT_REQUIREMENT])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(
        json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(markdown_report(result), encoding="utf-8")
    if plot:
        from .plot import plot_rd

        paths["plot"] = out / "rd.png"
        plot_rd(result, paths["plot"])
    return paths


def format_summary(result: dict[str, Any]) -> str:
    """Short plain-text summary printed by the CLI: BD table and JPEG check verdict."""
    lines = [f"BD against {result['anchor']} ({result['bd_method']}):"]
    labels = {k: v["label"] for k, v in result["codecs"].items()}
    labels.update({k: v["label"] for k, v in result["references"].items()})
    for name, e in result["bd"].items():
        lines.append(
            f"  {labels[name]:<36s} BD-rate {_fmt(e['bd_rate_pct'], '+7.1f', ' %'):>9s}   "
            f"BD-PSNR {_fmt(e['bd_psnr_db'], '+6.2f', ' dB'):>9s}"
        )
    if result.get("bd_note"):
        lines.append("  " + result["bd_note"])
    chk = result.get("jpeg_check")
    if chk:
        verdict = "consistent" if chk["consistent"] else "NOT consistent"
        lines.append(
            f"JPEG vs published Pillow JPEG: max |diff| {_fmt(chk['max_abs_diff_db'], '.2f')} dB "
            f"(tolerance {chk['tolerance_db']} dB): {verdict}"
        )
    return "\n".join(lines)
