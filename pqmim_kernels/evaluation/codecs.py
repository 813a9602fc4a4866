"""Codec adapters for the rate-distortion evaluation.

Every adapter turns an ``(H, W, 3)`` ``uint8`` RGB image into the **complete file** the codec
writes (container and headers included, so ``8 * len(bytes) / (H * W)`` is the honest bpp) and
back. A sweep of ``settings`` (quality, distance, or model) gives the RD points.

Adapters are plain picklable objects so that :mod:`pqmim_kernels.evaluation.sweep` can ship
them to worker processes; third-party libraries are imported lazily inside the methods, and a
library that is missing raises :class:`CodecUnavailable` from :meth:`Codec.check_available`,
which :func:`~pqmim_kernels.evaluation.selection.build_codecs` turns into a "skipping ..."
message rather than a crash.

Encoder parameters are fixed here (and recorded in :meth:`Codec.params`) so a run is
reproducible: libaom speed 6 for AVIF, libjxl effort 7, x265 defaults for HEIC, libjpeg-turbo
defaults for JPEG (no ``optimize``, as the published Pillow JPEG curves use), libwebp method 4.
Encoders run single-threaded where the library lets us choose: parallelism comes from the sweep
processing several images at once, and single-threaded timings are comparable across codecs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


class CodecUnavailable(RuntimeError):
    """The library behind a codec is not installed or lacks the needed encoder."""


class Codec:
    """Base class: one codec with a default sweep of settings.

    Subclasses set ``name`` (the ``--codecs`` key), ``label`` (legend text),
    ``setting_name`` (what a setting means) and ``default_settings``, and implement
    :meth:`encode` / :meth:`decode`.
    """

    name = ""
    label = ""
    setting_name = "quality"
    default_settings: tuple = ()

    def __init__(self, settings: Sequence | None = None) -> None:
        self.settings = tuple(self.default_settings if settings is None else settings)
        if not self.settings:
            raise ValueError(f"codec {self.name!r}: the settings sweep is empty")
        for s in self.settings:
            self.validate_setting(s)

    # --- to override -------------------------------------------------------------------------
    def validate_setting(self, setting: Any) -> None:
        """Raise ``ValueError`` if ``setting`` is not meaningful for this codec."""
        _check_int_range(self.name, setting, 0, 100)

    def check_available(self) -> None:
        """Raise :class:`CodecUnavailable` (with an install hint) if the codec cannot run."""

    def prepare(self) -> None:
        """Called once per image before the timed calls: one-off costs (loading a model, first-call
        initialisation) go here so that they never land in a setting's encode/decode time."""

    def versions(self) -> dict[str, str]:
        """Library versions that produced the numbers (recorded in the results JSON)."""
        return {}

    def params(self) -> dict[str, Any]:
        """Fixed encoder parameters (recorded in the results JSON)."""
        return {}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        """Encode an ``(H, W, 3)`` ``uint8`` image to the complete file bytes."""
        raise NotImplementedError

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        """Decode file bytes to an ``(H, W, 3)`` ``uint8`` image."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "setting_name": self.setting_name,
            "settings": list(self.settings),
            "params": self.params(),
            "versions": self.versions(),
        }


def _check_int_range(codec: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"codec {codec!r}: quality must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"codec {codec!r}: quality {value} is outside [{lo}, {hi}]")


def _pil_versions() -> dict[str, str]:
    import PIL
    from PIL import features

    out = {"pillow": PIL.__version__}
    turbo = features.version_feature("libjpeg_turbo")
    out["libjpeg"] = f"libjpeg-turbo {turbo}" if turbo else str(features.version("jpg"))
    return out


def _pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class PillowJPEG(Codec):
    """Baseline JPEG through Pillow / libjpeg-turbo; 4:2:0 (``jpeg``) or 4:4:4 (``jpeg444``)."""

    setting_name = "quality"
    default_settings = (3, 5, 10, 15, 20, 30, 50, 75)

    def __init__(self, subsampling: str = "4:2:0", settings: Sequence | None = None) -> None:
        if subsampling not in ("4:2:0", "4:4:4"):
            raise ValueError(
                f"PillowJPEG: subsampling must be '4:2:0' or '4:4:4', got {subsampling!r}"
            )
        self.subsampling = subsampling
        self.name = "jpeg" if subsampling == "4:2:0" else "jpeg444"
        self.label = f"JPEG {subsampling} (Pillow)"
        super().__init__(settings)

    def validate_setting(self, setting: Any) -> None:
        _check_int_range(self.name, setting, 1, 100)

    def versions(self) -> dict[str, str]:
        return _pil_versions()

    def params(self) -> dict[str, Any]:
        return {"subsampling": self.subsampling, "optimize": False, "progressive": False}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        # Pillow's subsampling codes: 0 = 4:4:4, 2 = 4:2:0.
        Image.fromarray(img).save(
            buf, "JPEG", quality=int(setting), subsampling=0 if self.subsampling == "4:4:4" else 2
        )
        return buf.getvalue()

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        return _pil_decode(data)


class PillowWebP(Codec):
    """Lossy WebP (VP8, 4:2:0) through Pillow / libwebp, ``method=4`` (libwebp default)."""

    name = "webp"
    label = "WebP (Pillow)"
    default_settings = (1, 10, 25, 40, 60, 75, 85)

    def check_available(self) -> None:
        from PIL import features

        if not features.check("webp"):
            raise CodecUnavailable("webp: this Pillow build has no WebP support")

    def versions(self) -> dict[str, str]:
        import PIL
        from PIL import features

        return {"pillow": PIL.__version__, "libwebp": str(features.version("webp"))}

    def params(self) -> dict[str, Any]:
        return {"method": 4, "lossless": False}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "WEBP", quality=int(setting), method=4, lossless=False)
        return buf.getvalue()

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        return _pil_decode(data)


def _import_imagecodecs(codec: str, attr: str):
    try:
        import imagecodecs
    except ImportError as exc:
        raise CodecUnavailable(
            f"{codec}: imagecodecs is not installed (pip install 'pqmim-kernels[eval]' "
            "or pip install imagecodecs)"
        ) from exc
    klass = getattr(imagecodecs, attr, None)
    if klass is None or not getattr(klass, "available", False):
        raise CodecUnavailable(f"{codec}: this imagecodecs build has no {attr} codec")
    return imagecodecs


class ImagecodecsAVIF(Codec):
    """AVIF (AV1 intra, libaom through libavif) via imagecodecs, YUV 4:4:4, 8 bit, speed 6."""

    name = "avif"
    label = "AVIF 4:4:4 (libaom)"
    default_settings = (10, 20, 30, 40, 50, 60, 70)
    speed = 6

    def check_available(self) -> None:
        ic = _import_imagecodecs(self.name, "AVIF")
        try:
            ic.avif_encode(np.zeros((16, 16, 3), np.uint8), 50, codec=ic.AVIF.CODEC_CHOICE.AOM)
        except Exception as exc:  # libavif reports a missing AV1 encoder only at encode time
            raise CodecUnavailable(f"avif: libavif has no usable libaom encoder ({exc})") from exc

    def versions(self) -> dict[str, str]:
        import imagecodecs as ic

        return {"imagecodecs": ic.__version__, "libavif": ic.avif_version()}

    def params(self) -> dict[str, Any]:
        return {"encoder": "aom", "speed": self.speed, "pixelformat": "YUV444", "bitdepth": 8}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        import imagecodecs as ic

        return bytes(
            ic.avif_encode(
                img,
                int(setting),
                speed=self.speed,
                pixelformat=ic.AVIF.PIXEL_FORMAT.YUV444,
                bitspersample=8,
                codec=ic.AVIF.CODEC_CHOICE.AOM,
                numthreads=1,
            )
        )

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        import imagecodecs as ic

        return np.asarray(ic.avif_decode(data, numthreads=1))


class ImagecodecsJXL(Codec):
    """JPEG XL (libjxl VarDCT) via imagecodecs; the setting is the Butteraugli distance."""

    name = "jxl"
    label = "JPEG XL (libjxl)"
    setting_name = "distance"
    default_settings = (15.0, 10.0, 7.0, 5.0, 3.5, 2.5, 1.5)
    effort = 7

    def validate_setting(self, setting: Any) -> None:
        if isinstance(setting, bool) or not isinstance(setting, (int, float, np.number)):
            raise ValueError(f"codec 'jxl': distance must be a number, got {setting!r}")
        if not 0.1 <= float(setting) <= 25.0:
            raise ValueError(f"codec 'jxl': distance {setting} is outside [0.1, 25]")

    def check_available(self) -> None:
        _import_imagecodecs(self.name, "JPEGXL")

    def versions(self) -> dict[str, str]:
        import imagecodecs as ic

        return {"imagecodecs": ic.__version__, "libjxl": ic.jpegxl_version()}

    def params(self) -> dict[str, Any]:
        return {"effort": self.effort, "container": False}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        import imagecodecs as ic

        return bytes(
            ic.jpegxl_encode(img, distance=float(setting), effort=self.effort, numthreads=1)
        )

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        import imagecodecs as ic

        return np.asarray(ic.jpegxl_decode(data, numthreads=1))


class PillowHeifHEIC(Codec):
    """HEIC (HEVC Main intra, x265 through libheif) via pillow-heif, 4:2:0, 8 bit."""

    name = "heic"
    label = "HEIC 4:2:0 (x265)"
    default_settings = (5, 10, 18, 25, 32, 40, 50)

    def check_available(self) -> None:
        try:
            import pillow_heif
        except ImportError as exc:
            raise CodecUnavailable(
                "heic: pillow-heif is not installed (pip install 'pqmim-kernels[eval]' "
                "or pip install pillow-heif)"
            ) from exc
        if not pillow_heif.libheif_info().get("encoders", {}).get("x265"):
            raise CodecUnavailable("heic: this pillow-heif build has no x265 (HEVC) encoder")

    def versions(self) -> dict[str, str]:
        import pillow_heif

        info = pillow_heif.libheif_info()
        return {
            "pillow_heif": pillow_heif.__version__,
            "libheif": str(info.get("libheif")),
            "encoder": str(info.get("encoders", {}).get("x265")),
            "decoder": str(info.get("decoders", {}).get("libde265", "")),
        }

    def params(self) -> dict[str, Any]:
        return {"chroma": "4:2:0", "bitdepth": 8, "encoder": "x265 (libheif defaults)"}

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        import pillow_heif

        h, w = img.shape[:2]
        heif = pillow_heif.from_bytes("RGB", (w, h), np.ascontiguousarray(img).tobytes())
        buf = io.BytesIO()
        heif.save(buf, quality=int(setting), chroma=420)
        return buf.getvalue()

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        import pillow_heif

        heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
        return np.asarray(heif.to_pillow().convert("RGB"))


class PQMIMCodec(Codec):
    """The PQ-MIM learned codec. A setting is a model name or path: one rate point per model
    (PQ-MIM trains one model per (M, K)); ``"MODEL@N"`` sends only the first N coding stages of
    that model and lets the decoder fill the rest (hybrid mode, PQMIM.md §7), so one model gives
    a sweep of lower-rate points (:func:`stage_settings`); ``"MODEL~L"`` codes with rate-aware
    assignment at ``rate_lambda`` L (:func:`lambda_settings`) and ``"MODEL+S"`` with ``S``
    steps of decoder-aware encoding (``latent_steps``; grammar: :func:`parse_setting`).
    The default sweep is every bundled preset, by quality (:func:`preset_names`).

    Talks to ``pqmim_kernels.models`` through three functions only: ``load_model(name_or_path,
    device=...)``, ``compress_image(img, model=...[, stages=N]) -> bytes`` and
    ``decompress_image(data, model=...) -> ndarray``. ``api`` lets tests inject any object with
    those attributes.
    """

    name = "pqmim"
    label = "PQ-MIM (ours)"
    setting_name = "model"
    default_settings = ("default",)
    _API_FUNCTIONS = ("load_model", "compress_image", "decompress_image")

    def __init__(self, settings: Sequence | None = None, api: Any = None, device: str = "cpu"):
        self._api = api
        self.device = device
        self._models: dict[str, Any] = {}
        super().__init__(preset_names() if settings is None else settings)

    def __getstate__(self):
        # Loaded models stay in the process that loaded them; a worker process loads each model
        # once (module-level cache, see _model) however many images it is sent.
        state = self.__dict__.copy()
        state["_models"] = {}
        return state

    def validate_setting(self, setting: Any) -> None:
        if not isinstance(setting, str) or not setting:
            raise ValueError(
                f"codec 'pqmim': a setting must be a model name or path, got {setting!r}"
            )
        split_setting(setting)

    def api(self):
        if self._api is not None:
            return self._api
        try:
            import pqmim_kernels.models as models
        except ImportError as exc:
            raise CodecUnavailable(
                f"pqmim: pqmim_kernels.models cannot be imported yet ({exc})"
            ) from exc
        return models

    def check_available(self) -> None:
        api = self.api()
        missing = [f for f in self._API_FUNCTIONS if not callable(getattr(api, f, None))]
        if missing:
            raise CodecUnavailable(
                f"pqmim: pqmim_kernels.models does not provide {', '.join(missing)} yet"
            )
        for s in self.settings:
            self._model(s)  # fail early (and clearly) on a bad model path

    def _model(self, setting: str):
        name, stages = split_setting(setting)
        if name not in self._models:
            preset = _find_preset(name) if self._api is None else None
            target = preset.path if preset is not None else name
            try:  # a rewritten model file under the same path is a different model
                stamp = os.stat(target).st_mtime_ns
            except OSError:
                stamp = None
            key = (name, str(target), self.device, stamp)
            cached = _PQMIM_MODELS.get(key) if self._api is None else None
            if cached is None:
                try:
                    cached = self.api().load_model(name, device=self.device)
                except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
                    raise CodecUnavailable(f"pqmim: cannot load model {name!r}: {exc}") from exc
                # first-call costs (lazy init of torch kernels, allocator) paid here, untimed
                warm = np.full((32, 32, 3), 128, np.uint8)
                self.api().decompress_image(self.api().compress_image(warm, model=cached), cached)
                if self._api is None:
                    _PQMIM_MODELS[key] = cached
            self._models[name] = cached
        model = self._models[name]
        total = getattr(getattr(model, "config", None), "stages", None)
        if stages is not None and total is not None and stages > total:
            raise CodecUnavailable(
                f"pqmim: setting {setting!r} asks for {stages} stages; the model codes {total}"
            )
        return model

    def prepare(self) -> None:
        for s in self.settings:
            self._model(s)

    def versions(self) -> dict[str, str]:
        from pqmim_kernels import __version__

        out = {"pqmim_kernels": __version__}
        try:
            import torch

            out["torch"] = torch.__version__
        except ImportError:
            pass
        return out

    def params(self) -> dict[str, Any]:
        """Device, and for every loaded model its id and the configuration that sets its rate
        (so a results file says exactly which weights produced the curve)."""
        out: dict[str, Any] = {"device": self.device}
        for name, model in self._models.items():
            info: dict[str, Any] = {}
            if callable(getattr(model, "model_id", None)):
                info["model_id"] = model.model_id().hex()
            cfg = getattr(model, "config", None)
            for key in ("num_subspaces", "codebook_size", "stages", "raw_bpp"):
                if hasattr(cfg, key):
                    info[key] = getattr(cfg, key)
            preset = _find_preset(name)
            if preset is not None:
                info["preset_quality"] = preset.quality
            if info:
                out[f"model {name}"] = info
        return out

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        _, stages, lam, steps = _parse_setting(setting)
        kwargs: dict[str, Any] = {} if stages is None else {"stages": stages}
        if lam:
            kwargs["rate_lambda"] = lam
        if steps:
            kwargs["latent_steps"] = steps
        return bytes(self.api().compress_image(img, model=self._model(setting), **kwargs))

    def decode(self, data: bytes, setting: Any) -> np.ndarray:
        return np.asarray(self.api().decompress_image(data, model=self._model(setting)))


_PQMIM_MODELS: dict[tuple, Any] = {}  # (name, file, device, mtime) -> loaded model, per process


def preset_names() -> tuple[str, ...]:
    """The bundled presets by quality (:mod:`pqmim_kernels.models.presets`): PQ-MIM's default
    sweep; ``PQMIMCodec.default_settings`` where the models package cannot be imported (then
    :meth:`PQMIMCodec.check_available` says why)."""
    try:
        from pqmim_kernels.models import presets
    except ImportError:
        return PQMIMCodec.default_settings
    return presets.names()


def _find_preset(name: str):
    try:
        from pqmim_kernels.models import presets
    except ImportError:
        return None
    return presets.find(name)


def parse_setting(setting: str) -> tuple[str, int | None, float | None]:
    """``"MODEL[@N][~L][+S]"`` -> ``(MODEL, N or None, L or None)``: a model name or path, then
    optionally ``@N`` (send the first N coding stages), ``~L`` (rate-aware assignment with
    ``rate_lambda`` L) and ``+S`` (``latent_steps`` S of decoder-aware encoding, read by
    :func:`setting_latent_steps`), in any order.

    Only a trailing ``@`` + digits is a stage count, a trailing ``~`` + a number a lambda and a
    trailing ``+`` + digits a step count, so paths containing ``@``, ``~`` or ``+`` still work.
    Raises ``ValueError`` for a stage count < 1 or a lambda that is negative or not finite (a
    step count above the encoder's limit fails when the first image is encoded).
    """
    return _parse_setting(setting)[:3]


def setting_latent_steps(setting: str) -> int:
    """The ``+S`` latent steps of a setting (0 without one; see :func:`parse_setting`)."""
    return _parse_setting(setting)[3]


def _parse_setting(setting: str) -> tuple[str, int | None, float | None, int]:
    name, stages, lam, steps = setting, None, None, None
    for _ in range(3):
        head, at, tail = name.rpartition("@")
        if stages is None and at and head and tail.isdigit():
            if int(tail) < 1:
                raise ValueError(f"codec 'pqmim': stages in {setting!r} must be >= 1")
            name, stages = head, int(tail)
            continue
        head, plus, tail = name.rpartition("+")
        if steps is None and plus and head and tail.isdigit():
            name, steps = head, int(tail)
            continue
        head, tilde, tail = name.rpartition("~")
        if lam is None and tilde and head:
            try:
                value = float(tail)
            except ValueError:
                break
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"codec 'pqmim': rate lambda in {setting!r} must be a finite number >= 0"
                )
            name, lam = head, value
            continue
        break
    return name, stages, lam, steps or 0


def latent_step_settings(settings: Sequence[str], steps: int) -> list[str]:
    """Each setting with ``latent_steps`` S: ``SETTING+S`` (``SETTING`` itself for S = 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"--pqmim-latent-steps: expected an integer >= 0, got {steps!r}")
    return [s if steps == 0 else f"{s}+{steps}" for s in settings]


def split_setting(setting: str) -> tuple[str, int | None]:
    """``"model.pt@4"`` -> ``("model.pt", 4)``; ``"model.pt"`` -> ``("model.pt", None)``; a
    ``~L`` lambda or ``+S`` steps suffix is dropped (see :func:`parse_setting`)."""
    name, stages, _ = parse_setting(setting)
    return name, stages


def lambda_settings(settings: Sequence[str], lambdas: Sequence[float]) -> list[str]:
    """Each setting at each rate lambda: ``SETTING~L`` (``SETTING`` itself for L = 0)."""
    out = []
    for lam in lambdas:
        if (
            isinstance(lam, bool)
            or not isinstance(lam, (int, float))
            or not (math.isfinite(lam) and lam >= 0)
        ):
            raise ValueError(f"--pqmim-lambdas: lambdas must be finite numbers >= 0, got {lam!r}")
    for s in settings:
        out.extend(s if lam == 0 else f"{s}~{lam:g}" for lam in lambdas)
    return out


def stage_settings(models: Sequence[str], stages: Sequence[int]) -> list[str]:
    """The settings ``MODEL@N`` for every model and stage count (a one-model sweep)."""
    for n in stages:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"--pqmim-stages: stage counts must be integers >= 1, got {n!r}")
    return [f"{m}@{int(n)}" for m in models for n in stages]


CODEC_NAMES = ("pqmim", "jpeg", "jpeg444", "webp", "avif", "jxl", "heic")


def make_codec(name: str, settings: Sequence | None = None, **kwargs: Any) -> Codec:
    """Build the adapter registered as ``name`` (see :data:`CODEC_NAMES`).

    ``settings`` overrides the default sweep; ``kwargs`` go to the adapter (``api``/``device``
    for ``pqmim``).
    """
    if name == "jpeg":
        return PillowJPEG("4:2:0", settings)
    if name == "jpeg444":
        return PillowJPEG("4:4:4", settings)
    classes = {
        "webp": PillowWebP,
        "avif": ImagecodecsAVIF,
        "jxl": ImagecodecsJXL,
        "heic": PillowHeifHEIC,
        "pqmim": PQMIMCodec,
    }
    if name not in classes:
        raise ValueError(f"unknown codec {name!r}; choose from {', '.join(CODEC_NAMES)}")
    return classes[name](settings, **kwargs)
