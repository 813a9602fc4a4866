"""Which codecs run, with which settings: ``--codecs`` / ``--qualities`` / ``--pqmim-*`` ->
codec adapters and published curves.

PQ-MIM's rate points are models: ``pqmim`` sweeps every bundled preset (by quality,
:mod:`pqmim_kernels.models.presets`), ``pqmim@NAME`` entries pick presets, ``--pqmim-models``
gives model files instead, and ``--pqmim-stages`` turns every model into a sweep ``MODEL@N``
over the number of coding stages sent (PQMIM.md §7). All of them make one ``pqmim`` curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .codecs import Codec, CodecUnavailable, make_codec, preset_names, stage_settings
from .reference import reference_curve

PQMIM_PREFIX = "pqmim@"


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


def group_pqmim(names: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Fold the ``pqmim`` / ``pqmim@NAME`` entries of ``names`` into one ``pqmim`` entry (at
    the place of the first): ``(names, presets)``, ``presets`` the names picked with
    ``pqmim@NAME`` (None: plain ``pqmim`` or no PQ-MIM at all).

    Raises ``ValueError`` for ``pqmim`` given together with ``pqmim@NAME`` and for a name that
    is no preset (the message lists the presets).
    """
    picked = [n[len(PQMIM_PREFIX) :] for n in names if n.startswith(PQMIM_PREFIX)]
    if not picked:
        return list(names), None
    if "pqmim" in names:
        raise ValueError(
            "--codecs: 'pqmim' already sweeps every preset; drop it or the "
            + ", ".join(PQMIM_PREFIX + p for p in picked)
        )
    known = preset_names()
    for name in picked:
        if name not in known:
            raise ValueError(
                f"--codecs: {PQMIM_PREFIX}{name}: no preset named {name!r} (presets: "
                f"{', '.join(known)}); model files go in --pqmim-models"
            )
    out: list[str] = []
    for n in names:
        entry = "pqmim" if n.startswith(PQMIM_PREFIX) else n
        if entry not in out:
            out.append(entry)
    return out, picked


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

    PQ-MIM settings are models: every preset (``pqmim``), the presets of ``pqmim@NAME``
    entries, or ``pqmim_models`` (files or preset names), one rate point each;
    ``pqmim_stages`` turns every model into a sweep ``MODEL@N``.

    Returns ``(codecs, references, skipped)``; ``skipped`` maps a codec name to the reason it
    cannot run here (library missing, model not loadable), which is also passed to ``log``.
    Unknown names and bad settings raise ``ValueError``.
    """
    names, picked = group_pqmim(names)
    qualities = dict(qualities or {})
    measured = [n for n in names if not n.startswith("ref:")]
    unused = sorted(set(qualities) - set(measured))
    if unused:
        raise ValueError(f"--qualities given for codecs not in --codecs: {', '.join(unused)}")
    if "pqmim" in qualities:
        raise ValueError("PQ-MIM rate points are models: use --pqmim-models, not --qualities")
    if picked and pqmim_models:
        raise ValueError("give pqmim@NAME entries in --codecs or --pqmim-models, not both")
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
            settings = list(pqmim_models or picked or ()) or None  # None: every preset
            if pqmim_stages:
                settings = stage_settings(settings or preset_names(), pqmim_stages)
            if pqmim_api is not None:
                kwargs["api"] = pqmim_api
            kwargs["device"] = pqmim_device
        codec = make_codec(name, settings, **kwargs)
        try:
            codec.check_available()
        except CodecUnavailable as exc:
            skipped[name] = str(exc)
            log(f"skipping {exc}")
            continue
        codecs.append(codec)
    return codecs, refs, skipped


def planned_curves(
    names: Sequence[str],
    qualities: dict[str, list] | None = None,
    pqmim_models: Sequence[str] | None = None,
    pqmim_stages: Sequence[int] | None = None,
) -> dict[str, int]:
    """Curve name -> number of points of what ``names`` asks for, without building anything
    (no model is loaded): what :func:`~.requirements.needed` decides from before any work.

    Raises ``ValueError`` for an unknown codec or reference curve, as :func:`build_codecs`
    would.
    """
    names, picked = group_pqmim(names)
    qualities = qualities or {}
    out: dict[str, int] = {}
    for name in names:
        if name.startswith("ref:"):
            out[name] = len(reference_curve(name[4:])["bpp"])
        elif name == "pqmim":
            models = len(pqmim_models or picked or preset_names())
            out[name] = models * (len(pqmim_stages) if pqmim_stages else 1)
        elif name in qualities:
            out[name] = len(qualities[name])
        else:
            out[name] = len(make_codec(name).settings)
    return out
