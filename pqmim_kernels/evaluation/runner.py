"""The rate-distortion evaluation behind ``pqmim eval``.

Pipeline: :func:`list_images` -> :func:`build_codecs` (adapters + published curves, skipping
codecs whose library is missing) -> :func:`run_codecs` (every image x codec x setting, in
parallel over (image, codec) jobs) -> :func:`summarize` (per-setting means, BD metrics against
the anchor, the JPEG consistency check) -> :func:`write_outputs` (JSON, markdown, PNG).

Conventions, as in learned-compression papers: per image, bpp = 8 * (bytes of the whole file) /
(H * W); PSNR on 8-bit RGB; a curve point is the *mean* bpp and the *mean* PSNR (and MS-SSIM)
over the images at one setting. Encode/decode times are wall-clock seconds of the library call
in a worker process, measured while ``workers`` jobs run side by side.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bd import bd_psnr, bd_rate, interpolate_psnr
from .codecs import Codec, CodecUnavailable, PQMIMCodec, make_codec, stage_settings
from .metrics import MS_SSIM_MIN_SIDE, ms_ssim, ms_ssim_db, psnr
from .reference import reference_curve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
JPEG_CHECK_TOLERANCE_DB = 0.3


# ----------------------------------------------------------------------------- images
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


# ----------------------------------------------------------------------------- codecs
def parse_codec_list(text: str) -> list[str]:
    """Split ``"jpeg,webp,ref:vtm"`` into names; rejects empty and duplicate entries."""
    names = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"--codecs: empty entry in {text!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--codecs: duplicate entries {', '.join(dupes)}")
    return names


def parse_qualities(entries: Sequence[str] | None) -> dict[str, list]:
    """Parse ``["jpeg=10,20,30", "jxl=1.5,3"]`` into ``{"jpeg": [10, 20, 30], "jxl": [1.5, 3.0]}``.

    Integers stay integers (quality), anything with a dot or exponent becomes a float (distance).
    """
    out: dict[str, list] = {}
    for entry in entries or ():
        name, sep, values = entry.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise ValueError(f"--qualities: expected CODEC=V1,V2,..., got {entry!r}")
        parsed = []
        for v in values.split(","):
            v = v.strip()
            try:
                parsed.append(int(v) if v.lstrip("-").isdigit() else float(v))
            except ValueError:
                raise ValueError(f"--qualities: {v!r} in {entry!r} is not a number") from None
        out[name] = parsed
    return out


def build_codecs(
    names: Sequence[str],
    qualities: dict[str, list] | None = None,
    pqmim_models: Sequence[str] | None = None,
    pqmim_api: Any = None,
    log: Callable[[str], None] = print,
    pqmim_stages: Sequence[int] | None = None,
    pqmim_device: str = "cpu",
) -> tuple[list[Codec], list[dict], dict[str, str]]:
    """Adapters for ``names`` (``ref:NAME`` entries become published curves).

    PQ-MIM settings are models (``pqmim_models``, default the bundled one), one rate point each;
    ``pqmim_stages`` turns every model into a sweep ``MODEL@N`` over the number of coding stages
    sent (PQMIM.md §7).

    Returns ``(codecs, references, skipped)``; ``skipped`` maps a codec name to the reason it
    cannot run here (library missing, model not loadable), which is also passed to ``log``.
    Unknown names and bad settings raise ``ValueError``.
    """
    qualities = dict(qualities or {})
    measured = [n for n in names if not n.startswith("ref:")]
    unused = sorted(set(qualities) - set(measured))
    if unused:
        raise ValueError(f"--qualities given for codecs not in --codecs: {', '.join(unused)}")
    if "pqmim" in qualities:
        raise ValueError("PQ-MIM rate points are models: use --pqmim-models, not --qualities")
    codecs: list[Codec] = []
    refs: list[dict] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name.startswith("ref:"):
            refs.append(reference_curve(name[4:]))
            continue
        settings = qualities.get(name)
        kwargs: dict[str, Any] = {}
        if name == "pqmim":
            if pqmim_models:
                settings = list(pqmim_models)
            if pqmim_stages:
                settings = stage_settings(settings or PQMIMCodec.default_settings, pqmim_stages)
            if pqmim_api is not None:
                kwargs["api"] = pqmim_api
            kwargs["device"] = pqmim_device
        elif name in qualities:
            settings = qualities[name]
        codec = make_codec(name, settings, **kwargs)
        try:
            codec.check_available()
        except CodecUnavailable as exc:
            skipped[name] = str(exc)
            log(f"skipping {exc}")
            continue
        codecs.append(codec)
    return codecs, refs, skipped


# ----------------------------------------------------------------------------- measuring
def evaluate_image(path: str | os.PathLike, codec: Codec) -> list[dict[str, Any]]:
    """All settings of ``codec`` on one image: one record per setting.

    Record keys: image, codec, setting, bytes, bpp, psnr, ms_ssim (None if the image is smaller
    than :data:`~pqmim_kernels.evaluation.metrics.MS_SSIM_MIN_SIDE`), encode_s, decode_s.
    """
    img = load_rgb(path)
    h, w = img.shape[:2]
    codec.prepare()  # model loading and first-call costs stay out of the timings
    records = []
    for setting in codec.settings:
        t0 = time.perf_counter()
        data = codec.encode(img, setting)
        t1 = time.perf_counter()
        rec = codec.decode(data, setting)
        t2 = time.perf_counter()
        if not isinstance(rec, np.ndarray) or rec.shape != img.shape or rec.dtype != np.uint8:
            got = (getattr(rec, "shape", None), getattr(rec, "dtype", type(rec).__name__))
            raise RuntimeError(
                f"{codec.name} at {codec.setting_name}={setting} decoded {Path(path).name} to "
                f"shape/dtype {got}, expected {img.shape} uint8"
            )
        records.append(
            {
                "image": Path(path).name,
                "codec": codec.name,
                "setting": setting,
                "bytes": len(data),
                "bpp": 8.0 * len(data) / (h * w),
                "psnr": psnr(img, rec),
                "ms_ssim": ms_ssim(img, rec) if min(h, w) >= MS_SSIM_MIN_SIDE else None,
                "encode_s": t1 - t0,
                "decode_s": t2 - t1,
            }
        )
    return records


def _worker_init() -> None:
    # One image per process at a time: keep BLAS/OpenMP/torch from oversubscribing the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def run_codecs(
    images: Sequence[Path],
    codecs: Sequence[Codec],
    workers: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (image, codec) job; ``workers > 1`` uses a process pool (spawn context).

    Returns all per-image records, ordered by codec, then image, then setting.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = [(img, codec) for codec in codecs for img in images]
    results: dict[int, list] = {}
    bar = tqdm(total=len(jobs), desc="eval", unit="job", disable=not progress, file=sys.stderr)
    try:
        if workers == 1 or len(jobs) == 1:
            for i, (img, codec) in enumerate(jobs):
                bar.set_postfix_str(f"{codec.name} {Path(img).name}", refresh=False)
                results[i] = evaluate_image(img, codec)
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init
            ) as pool:
                futures = {
                    pool.submit(evaluate_image, img, codec): i
                    for i, (img, codec) in enumerate(jobs)
                }
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    return [rec for i in range(len(jobs)) for rec in results[i]]


# ----------------------------------------------------------------------------- summary
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
        ar, aq = _finite_curve(anchor["bpp"], anchor[metric])
        tr, tq = _finite_curve(test["bpp"], test[metric])
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


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (CPU model, cores, OS, Python and numpy versions)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def summarize(
    records: Sequence[dict],
    codecs: Sequence[Codec],
    references: Sequence[dict] = (),
    anchor: str = "jpeg",
    bd_method: str = "pchip",
) -> dict[str, Any]:
    """Curves per codec, BD metrics of every curve against ``anchor``, and the JPEG check."""
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


# ----------------------------------------------------------------------------- outputs
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
    """Write ``results.json``, ``results.md`` and (if ``plot``) ``rd.png``; returns the paths."""
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
    """
    from .bd import METHODS

    if bd_method not in METHODS:
        raise ValueError(f"unknown BD method {bd_method!r}; choose from {', '.join(METHODS)}")
    images = list_images(images_dir, limit)
    for path in images:  # fail before any work on an unreadable file, naming it
        load_rgb(path)
    if merge is not None:  # a bad --merge file fails before the (long) run, not after it
        load_previous(merge, images, [])
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
