"""The RD plot of an evaluation result: PSNR vs bpp and MS-SSIM (dB) vs bpp.

Measured curves are solid lines with markers through their Pareto front (the best point for each
rate, :func:`.summary.pareto_front`); points off the front are faint markers, and a PQ-MIM sweep
over several models also draws each model's own sweep (its stages or lambdas) as a thin line.
Published reference curves are dashed, grey-ish and labelled "published" so nobody mistakes
them for runs. Uses matplotlib's Agg backend (no
display needed).
"""

from __future__ import annotations

import os
from typing import Any

from .summary import pareto_front


def _by_model(curve: dict[str, Any]) -> dict[str, list[int]]:
    """Indices of a PQ-MIM curve's points per model (the setting without ``@N`` / ``~L``)."""
    from .codecs import parse_setting

    out: dict[str, list[int]] = {}
    for k, point in enumerate(curve.get("points", [])):
        name = parse_setting(point["setting"])[0]
        out.setdefault(os.path.basename(name), []).append(k)
    return out


def plot_rd(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> None:
    """Write the two-panel RD plot of ``result`` (see :func:`.summary.summarize`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    for i, (name, c) in enumerate(result["codecs"].items()):
        style = {"color": colors[i % len(colors)], "marker": "o", "markersize": 4, "lw": 1.6}
        if name == "pqmim":
            style.update(color="black", marker="*", markersize=9, lw=2.2)
        metrics = [(ax_p, c["psnr"])]
        if c.get("ms_ssim_db") is not None:
            metrics.append((ax_m, c["ms_ssim_db"]))
        for ax, quality in metrics:
            fb, fq = pareto_front(c["bpp"], quality)
            ax.plot(fb, fq, label=c["label"], **style)
            groups = _by_model(c) if name == "pqmim" else {}
            if len(groups) > 1:  # each model's own sweep (stages, lambdas), thin and faint
                for j, (model, idx) in enumerate(groups.items()):
                    pts = sorted((c["bpp"][k], quality[k]) for k in idx)
                    ax.plot(*zip(*pts), lw=0.9, marker="o", markersize=3, alpha=0.6,
                            color=plt.get_cmap("Set1").colors[j % 9],
                            label=f"  {model} (its sweep)")  # fmt: skip
            elif len(fb) < len(c["bpp"]):
                ax.plot(c["bpp"], quality, ls="none", marker=style["marker"], alpha=0.3,
                        markersize=style["markersize"] * 0.7, color=style["color"])  # fmt: skip
    ref_colors = plt.get_cmap("Dark2").colors
    for i, r in enumerate(result["references"].values()):
        ax_p.plot(
            r["bpp"],
            r["psnr"],
            ls="--",
            lw=1.3,
            marker="x",
            markersize=4,
            color=ref_colors[i % len(ref_colors)],
            label=f"{r['label']} (not run here)",
        )
    heading = title or f"{result['dataset']} ({result['n_images']} images)"
    ax_p.set(xlabel="bits per pixel (whole file)", ylabel="RGB PSNR (dB)", title=heading)
    ax_m.set(
        xlabel="bits per pixel (whole file)",
        ylabel="MS-SSIM (dB) = -10 log10(1 - MS-SSIM)",
        title=f"{heading}: MS-SSIM",
    )
    for ax in (ax_p, ax_m):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    ax_p.legend(fontsize=7.5, loc="lower right")
    if ax_m.lines:
        ax_m.legend(fontsize=7.5, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
