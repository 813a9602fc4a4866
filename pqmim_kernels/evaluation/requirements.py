"""Optional dependencies of ``pqmim eval``, checked before any work.

The base install (``pip install pqmim-kernels``) has what measuring needs: Pillow (JPEG, WebP,
image files), numpy (PSNR, MS-SSIM), torch (PQ-MIM) and tqdm. The ``eval`` extra
(``pip install 'pqmim-kernels[eval]'``) adds:

- scipy: PCHIP interpolation, used by BD metrics with ``--bd-method pchip`` (the default) and by
  the JPEG consistency check (``jpeg`` with two or more settings);
- matplotlib: the RD plot ``rd.png`` (not with ``--no-plot``);
- imagecodecs (AVIF, JPEG XL) and pillow-heif (HEIC): a codec whose library is missing is
  skipped with a message naming the package (:meth:`Codec.check_available`), not an error.

:func:`needed` says which of the first two a run will use, from what it is asked to do;
:func:`require` raises :class:`MissingDependency` naming the extra, the packages and the
options that do without them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence

EXTRA_INSTALL = "pip install 'pqmim-kernels[eval]'"


class MissingDependency(RuntimeError):
    """An optional package that the requested evaluation needs is not installed."""


@dataclasses.dataclass(frozen=True)
class Requirement:
    """``module`` (imported to check), from the pip ``package``, needed for ``purpose``;
    ``avoid``: the command-line option that does without it (None: nothing does)."""

    module: str
    package: str
    purpose: str
    avoid: str | None = None


BD_REQUIREMENT = Requirement(
    "scipy.interpolate", "scipy", "BD metrics with --bd-method pchip", "--bd-method cubic"
)
JPEG_CHECK_REQUIREMENT = Requirement("scipy.interpolate", "scipy", "the JPEG consistency check")
PLOT_REQUIREMENT = Requirement("matplotlib", "matplotlib", "the RD plot rd.png", "--no-plot")


def needed(curves: Mapping[str, int], anchor: str, bd_method: str, plot: bool) -> list[Requirement]:
    """The optional packages a run uses.

    ``curves``: every curve the result will hold (measured now, merged, published) -> its
    number of points. A curve of one point gets no BD metric and no interpolation, so BD
    metrics need scipy only when the anchor and another curve both have two or more points.
    """
    out = []
    if bd_method == "pchip" and curves.get(anchor, 0) >= 2:
        if any(n >= 2 for name, n in curves.items() if name != anchor):
            out.append(BD_REQUIREMENT)
    if curves.get("jpeg", 0) >= 2:
        out.append(JPEG_CHECK_REQUIREMENT)
    if plot:
        out.append(PLOT_REQUIREMENT)
    return out


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(requirements: Sequence[Requirement]) -> None:
    """Raise :class:`MissingDependency` if a module of ``requirements`` cannot be imported.

    The one-line message names every missing package with what needs it, the extra that
    installs them all, and the options that do without them (only when those options alone make
    the run work).
    """
    missing: dict[str, list[Requirement]] = {}
    checked: dict[str, bool] = {}
    for req in requirements:
        if req.module not in checked:
            checked[req.module] = _importable(req.module)
        if not checked[req.module]:
            missing.setdefault(req.package, []).append(req)
    if not missing:
        return
    parts = [f"{pkg} ({'; '.join(r.purpose for r in reqs)})" for pkg, reqs in missing.items()]
    avoid = [r.avoid for reqs in missing.values() for r in reqs]
    them = "them" if len(missing) > 1 else "it"
    msg = (
        f"missing optional {'dependencies' if len(missing) > 1 else 'dependency'}: "
        f"{', '.join(parts)}. Install {them} with {EXTRA_INSTALL} (or: pip install "
        f"{' '.join(missing)})"
    )
    if all(avoid):  # only when that alone makes the run work
        msg += f"; or run with {' '.join(dict.fromkeys(avoid))}"
    raise MissingDependency(msg)
