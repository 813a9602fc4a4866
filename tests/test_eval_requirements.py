"""``pqmim eval`` after the base install: what needs the ``eval`` extra is named before any work.

The subprocess tests hide scipy, matplotlib, imagecodecs and pillow-heif from a fresh
interpreter (an import blocker), which is what ``pip install -e .`` without extras leaves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.evaluation import report, requirements, runner
from pqmim_kernels.evaluation.requirements import (
    BD_REQUIREMENT,
    JPEG_CHECK_REQUIREMENT,
    PLOT_REQUIREMENT,
    MissingDependency,
    needed,
    require,
)

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("scipy", "matplotlib", "imagecodecs", "pillow_heif")
BLOCKER = f"""
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
from pqmim_kernels.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
BOTH_MISSING = (
    "pqmim eval: error: missing optional dependencies: scipy (BD metrics with --bd-method "
    "pchip; the JPEG consistency check), matplotlib (the RD plot rd.png). Install them with "
    "pip install 'pqmim-kernels[eval]' (or: pip install scipy matplotlib)\n"
)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        yy, xx = np.mgrid[0:40, 0:48]
        img = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 30, (40, 48, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"im{i}.png")
    return d


def _hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError


def _base_install(*argv):
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_needed_follows_what_the_run_computes():
    curves = {"jpeg": 8, "webp": 7, "ref:vtm": 6}
    assert needed(curves, "jpeg", "pchip", plot=True) == [
        BD_REQUIREMENT,
        JPEG_CHECK_REQUIREMENT,
        PLOT_REQUIREMENT,
    ]
    assert needed(curves, "jpeg", "cubic", plot=False) == [JPEG_CHECK_REQUIREMENT]
    # no anchor curve, or nothing of two points to compare it with: no BD metric, no scipy
    assert needed({"webp": 7}, "jpeg", "pchip", plot=False) == []
    assert needed({"webp": 7, "pqmim": 1}, "webp", "pchip", plot=False) == []
    # a one-point JPEG curve gets no consistency check
    assert needed({"jpeg": 1, "webp": 7}, "webp", "cubic", plot=False) == []


def test_require_names_the_extra_and_the_way_around(monkeypatch):
    require([BD_REQUIREMENT, PLOT_REQUIREMENT])  # installed in the test environment
    _hide(monkeypatch, "scipy", "scipy.interpolate", "matplotlib")
    with pytest.raises(MissingDependency) as exc:
        require([BD_REQUIREMENT, PLOT_REQUIREMENT])
    assert str(exc.value) == (
        "missing optional dependencies: scipy (BD metrics with --bd-method pchip), matplotlib "
        "(the RD plot rd.png). Install them with pip install 'pqmim-kernels[eval]' (or: pip "
        "install scipy matplotlib); or run with --bd-method cubic --no-plot"
    )
    # the JPEG check has no option around scipy: no "or run with" that would fail again
    with pytest.raises(MissingDependency) as exc:
        require([BD_REQUIREMENT, JPEG_CHECK_REQUIREMENT, PLOT_REQUIREMENT])
    assert f"pqmim eval: error: {exc.value}\n" == BOTH_MISSING
    with pytest.raises(MissingDependency, match=r"^missing optional dependency: matplotlib \(th"):
        require([PLOT_REQUIREMENT])
    assert isinstance(MissingDependency("x"), RuntimeError)  # the CLI's one-line error path


def test_evaluate_stops_before_measuring(image_dir, monkeypatch):
    monkeypatch.setattr(runner, "run_codecs", lambda *a, **k: pytest.fail("sweep started"))
    _hide(monkeypatch, "scipy", "scipy.interpolate")
    with pytest.raises(MissingDependency, match=r"^missing optional dependency: scipy \(BD "):
        runner.evaluate(image_dir, ["jpeg", "webp"], progress=False)


def test_write_outputs_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependency, match="matplotlib .*or run with --no-plot$"):
        report.write_outputs({}, tmp_path / "out", plot=True)
    assert not (tmp_path / "out").exists()


def test_cli_counts_merged_curves(image_dir, tmp_path, monkeypatch, capsys):
    """A merged jpeg curve brings the JPEG check along, even when this run measures webp."""
    first = tmp_path / "first"
    argv = ["eval", str(image_dir), "--no-progress", "--workers", "1", "--no-plot"]
    assert main([*argv, "--codecs", "jpeg", "--out", str(first)]) == 0
    capsys.readouterr()
    _hide(monkeypatch, "scipy", "scipy.interpolate")
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    merge = ["--merge", str(first / "results.json"), "--bd-method", "cubic"]
    out = tmp_path / "second"
    assert main([*argv, "--codecs", "webp", "--out", str(out), *merge]) == 1
    assert capsys.readouterr().err == (
        "pqmim eval: error: missing optional dependency: scipy (the JPEG consistency check). "
        "Install it with pip install 'pqmim-kernels[eval]' (or: pip install scipy)\n"
    )
    assert not out.exists()  # nothing created for a run that cannot start


def test_base_install_says_what_to_install_before_any_work(image_dir, tmp_path):
    out = tmp_path / "out"
    r = _base_install("eval", image_dir, "--codecs", "jpeg,webp", "--out", out, "--no-progress")
    assert r.returncode == 1, r.stderr
    assert r.stderr == BOTH_MISSING
    assert not out.exists()


def test_base_install_runs_what_it_has(image_dir, tmp_path):
    out = tmp_path / "out"
    q = "5,20,50,80"
    r = _base_install(
        "eval", image_dir, "--codecs", "webp,jpeg444,avif,heic", "--anchor", "webp",
        "--bd-method", "cubic", "--no-plot", "--out", out, "--no-progress", "--workers", "1",
        "--qualities", f"webp={q}", "--qualities", f"jpeg444={q}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "pqmim eval: skipping avif: imagecodecs is not installed (pip install "
        "'pqmim-kernels[eval]' or pip install imagecodecs)"
    ) in r.stderr
    assert "skipping heic: pillow-heif is not installed" in r.stderr
    result = json.loads((out / "results.json").read_text())
    assert list(result["codecs"]) == ["webp", "jpeg444"]
    assert result["bd"]["jpeg444"]["bd_rate_pct"] is not None  # the cubic BD needs numpy only
    assert not (out / "rd.png").exists()


def test_requirements_module_lists_the_extra_of_pyproject():
    """The install line in the messages is the extra that pyproject.toml really defines."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert requirements.EXTRA_INSTALL == "pip install 'pqmim-kernels[eval]'"
    listed = {spec.split(">")[0].split("=")[0] for spec in extras["eval"]}
    assert {"scipy", "matplotlib", "imagecodecs", "pillow-heif"} <= listed
