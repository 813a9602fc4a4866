"""PQ-MIM models: the codec, its configuration, saving/loading and the bundled presets.

- :class:`PQMIM` (``forward`` / ``compress`` / ``decompress``) and :class:`PQMIMConfig`.
- :func:`load_model` (a preset name from :mod:`.presets`, e.g. ``"default"``, or a path),
  :func:`save_model`.
- :func:`compress_image` / :func:`decompress_image`: uint8 HxWx3 arrays <-> ``.pqm`` bytes;
  :func:`compress_to_fit`: the best file within a byte budget over presets and stages.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pqmim_kernels.models import presets
from pqmim_kernels.models.codec import PQMIM, check_rate_lambda
from pqmim_kernels.models.config import PQMIMConfig

__all__ = [
    "DEFAULT_MODEL_PATH",
    "PQMIM",
    "BudgetFit",
    "PQMIMConfig",
    "compress_image",
    "compress_to_fit",
    "decompress_image",
    "load_model",
    "load_variants",
    "model_for_file",
    "preset_model",
    "presets",
    "save_model",
]

# The first bundled model's file (preset "default", now retired: it decodes its files; the
# default for compressing is presets.DEFAULT_PRESET).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "data" / "default_model.pt"
_FILE_KIND = "pqmim-model"
# 2: entropy model v2 and its integer export (.pqm format 3). Version-1 files hold the first
# entropy model, which this release cannot code with (their PQ-VAE can be reused: train with
# ``--init-from``).
_FILE_VERSION = 2


def _stored(t: torch.Tensor, half: bool) -> torch.Tensor:
    t = t.detach().cpu()
    if half and t.is_floating_point() and torch.isfinite(t.half()).all():
        t = t.half()
    return t.clone()


def save_model(
    model: PQMIM,
    path: str | os.PathLike,
    *,
    half: bool = True,
    extra=None,
    variants: dict[str, PQMIM] | None = None,
    perceptual_int8: bool | None = None,
) -> None:
    """Write ``model`` (config + state dict) to ``path``.

    ``half``: store floating tensors as float16 where that is finite (halves the file; the model
    id is computed after loading, so encoder and decoder always agree). ``extra``: a small dict
    of metadata (training steps, ...).

    The model's :attr:`~PQMIM.aliases` (ids of earlier models that decode exactly like it,
    :meth:`PQMIM.add_alias`) are stored with it, and with each variant its own, so files of
    those ids keep decoding when only the encoder changed; they cost no weights.

    ``variants``: ``{name: other model}`` stored in the same file at the cost of their decoder
    only: each must equal ``model`` but for its decoder (and ``decoder_extra_blocks``), e.g. the
    model whose decoder :func:`pqmim_kernels.models.refine.refine_decoder` refined into
    ``model``; ``load_model(path, variant=name)`` gives it back with its own model id, so the
    files it wrote keep decoding when the refined model replaces it (``presets.Preset.variant``).
    Their decoder tensors are stored as float16 only where that is exact. The file is read back
    once to check that every variant reproduces its model id (``ValueError`` if not, or if a
    variant differs from ``model`` in more than its decoder).

    ``perceptual_int8``: store the perceptual decoder's weight tensors (the perceptual decoder
    is no part of the model id: its output is not bit-exact anyway) as int8 with a float32 scale
    per output row, half the size of float16; on 8 held-out photos its decodes differed from the
    float16 one's by 54 dB PSNR (-0.002 dB against the originals). None (default): as it was
    loaded; False: float16 (with ``half``).
    """
    state = {name: _stored(t, half) for name, t in model.state_dict().items()}
    blob = {
        "kind": _FILE_KIND,
        "version": _FILE_VERSION,
        "config": model.config.to_dict(),
        "state_dict": state,
        "extra": extra or {},
    }
    if _own_aliases(model):
        blob["aliases"] = _own_aliases(model)
    int_state = model.int_state()
    if int_state is not None:
        blob["int_entropy_model"] = {"tensors": int_state[0], "meta": int_state[1]}
    if model.perceptual_decoder is not None:
        perceptual = model.perceptual_decoder.state_dict()
        if perceptual_int8 is None:  # as it was loaded
            perceptual_int8 = bool(getattr(model.perceptual_decoder, STORED_INT8, False))
        if perceptual_int8:  # another key: a release that cannot read it sees no such decoder
            blob["perceptual_decoder_q"] = _int8_rows(perceptual)
        else:
            blob["perceptual_decoder"] = {
                k: v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()
                for k, v in perceptual.items()
            }
        # its own size: it may have fewer extra blocks than the MSE decoder (the config's)
        blob["perceptual_decoder_blocks"] = list(_perceptual_blocks(model))
    if not variants:
        torch.save(blob, str(path))
        return
    blob["variants"] = {name: _variant_entry(model, m, name) for name, m in variants.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, str(tmp))
    try:  # written next to the target, checked, then moved over it: never a broken file there
        for name in variants:
            try:
                load_model(tmp, variant=name)
            except ValueError as exc:
                raise ValueError(
                    f"save_model: variant {name!r} does not survive storage in {path} ({exc}); "
                    "its shared weights must be what the file stores (fp16 with half=True)"
                ) from exc
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Set on a perceptual decoder that was stored as int8 rows, so that saving it again keeps that.
STORED_INT8 = "_pqmim_stored_int8"


def _int8_rows(state: dict) -> dict:
    """``state`` with each floating tensor of 2+ dims as int8 ``round(w / s)``, ``s`` the float32
    per-row (dim 0) scale ``max|w| / 127``, under ``"tensors"`` (the rest float16) and the
    scales under ``"scales"``."""
    tensors, scales = {}, {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.ndim >= 2:
            dims = tuple(range(1, v.ndim))
            s = (v.float().abs().amax(dim=dims) / 127).clamp_min(1e-30)
            shape = (-1,) + (1,) * (v.ndim - 1)
            tensors[k] = (v.float() / s.view(shape)).round().clamp(-127, 127).to(torch.int8)
            scales[k] = s
        else:
            tensors[k] = v.half() if v.is_floating_point() else v
    return {"tensors": tensors, "scales": scales}


def _from_int8_rows(stored: dict) -> dict:
    """The float32 state dict :func:`_int8_rows` stored."""
    out = {}
    for k, v in stored["tensors"].items():
        s = stored["scales"].get(k)
        out[k] = v.float() if s is None else v.float() * s.float().view((-1,) + (1,) * (v.ndim - 1))
    return out


def _perceptual_blocks(model: PQMIM) -> tuple[int, int, int]:
    """The extra blocks (strides 16, 8, 4) of ``model``'s perceptual decoder."""
    return tuple(model.perceptual_decoder.extra_blocks)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _own_aliases(model: PQMIM) -> list[str]:
    """``model``'s aliases as hex strings, without its own id."""
    mine = model.model_id()
    return [a.hex() for a in model.aliases if a != mine]


def _variant_entry(model: PQMIM, other: PQMIM, name: str) -> dict:
    """What ``other`` stores in ``model``'s file: its config, decoder and model id."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"save_model: variant names must be non-empty strings, got {name!r}")
    mine, theirs = model.config.to_dict(), other.config.to_dict()
    differ = sorted(k for k in mine if mine[k] != theirs[k] and k != "decoder_extra_blocks")
    if differ:
        raise ValueError(
            f"save_model: variant {name!r} differs from the model in {differ}; a variant may "
            "differ in its decoder only"
        )
    a, b = model.state_dict(), other.state_dict()
    shared = lambda sd: {k for k in sd if not k.startswith("decoder.")}  # noqa: E731
    if shared(a) != shared(b) or any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in shared(a)):
        raise ValueError(
            f"save_model: variant {name!r} has other encoder, quantizer or entropy-model weights "
            "than the model; a variant may differ in its decoder only"
        )
    ia, ib = model._int_tensors, other._int_tensors
    if (ia is None) != (ib is None) or (
        ia is not None
        and (ia.keys() != ib.keys() or any(not torch.equal(ia[k], ib[k]) for k in ia))
    ) or model._int_meta != other._int_meta:
        raise ValueError(f"save_model: variant {name!r} has another integer entropy model")
    # the file's perceptual decoder reads the variant's codes too (load_model gives it to every
    # variant): a variant may carry that one, no other
    if other.perceptual_decoder is not None and (
        model.perceptual_decoder is None
        or not _same_weights(model.perceptual_decoder, other.perceptual_decoder)
    ):
        raise ValueError(
            f"save_model: variant {name!r} has another perceptual decoder than the model "
            "(a file stores one, which every variant uses)"
        )
    decoder = {}
    for k, t in other.decoder.state_dict().items():
        t = t.detach().cpu()
        exact = t.is_floating_point() and torch.equal(t.half().float(), t.float())
        decoder[k] = t.half().clone() if exact else t.clone()
    return {
        "config": theirs,
        "decoder": decoder,
        "model_id": other.model_id().hex(),
        "aliases": _own_aliases(other),
    }


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str = "cpu",
    *,
    variant: str | None = None,
) -> PQMIM:
    """Load a PQ-MIM model in eval mode, floats in fp32.

    ``name_or_path``: None for the default preset (:data:`presets.DEFAULT_PRESET`), a preset
    name (:func:`presets.every`: the quality ladder and the retired models; a preset name
    wins over a file of that name in the working folder, write ``./NAME`` for the file) or the
    path of a file written by :func:`save_model` / ``pqmim train``. ``variant``: a model stored
    inside the file beside its own (``save_model(variants=...)``; a preset with
    ``Preset.variant`` names it itself). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a file that is not a PQ-MIM model, a variant the file does not hold or one
    that does not reproduce its model id.
    """
    preset, path = _model_path(name_or_path, "load_model")
    if preset is not None and preset.variant:
        if variant not in (None, preset.variant):
            raise ValueError(
                f"load_model: preset {preset.name} is variant {preset.variant!r}, not {variant!r}"
            )
        variant = preset.variant
    return _model_from_blob(_read_model_file(path), path, variant).to(device).eval()


def _model_from_blob(blob: dict, path: Path, variant: str | None) -> PQMIM:
    """The model (or its ``variant``) a checked model file holds (:func:`_read_model_file`),
    fp32, on the CPU; ``ValueError`` as :func:`load_model` documents."""
    config, state = blob["config"], dict(blob["state_dict"])
    entry = None
    if variant is not None:
        held = blob.get("variants") or {}
        if variant not in held:
            raise ValueError(
                f"load_model: {path} holds no variant {variant!r} "
                f"(it holds: {', '.join(sorted(held)) or 'none'})"
            )
        entry = held[variant]
        config = entry["config"]
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        state.update({f"decoder.{k}": v for k, v in entry["decoder"].items()})
    model = PQMIM(PQMIMConfig.from_dict(config))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    if "int_entropy_model" in blob:
        im = blob["int_entropy_model"]
        model.set_int_entropy_model(im["tensors"], im["meta"])
    if "perceptual_decoder" in blob or "perceptual_decoder_q" in blob:  # variants' codes too
        own = PQMIMConfig.from_dict(blob["config"])
        model.perceptual_decoder = _stored_perceptual(blob, own, path)
    model.training_info = blob.get("extra", {})
    model.aliases = _aliases((entry or blob).get("aliases", []), path)
    if entry is not None:
        got = model.model_id().hex()
        if got != entry["model_id"]:
            raise ValueError(
                f"load_model: variant {variant!r} of {path} gives model id {got}, not the "
                f"{entry['model_id']} it was saved with: the file is damaged"
            )
        model.training_info = {**model.training_info, "variant": variant}
    return model


def _model_path(name_or_path, caller: str) -> tuple[presets.Preset | None, Path]:
    """``(the preset or None, the model file)`` that ``name_or_path`` names (None: the default
    preset); ``FileNotFoundError`` naming the preset, or suggesting one, if there is no file."""
    if name_or_path is None:
        name_or_path = presets.DEFAULT_PRESET
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{caller}: expected a name or path, got {type(name_or_path).__name__}")
    preset = presets.find(str(name_or_path))
    path = preset.path if preset is not None else Path(name_or_path)
    if not path.is_file():
        if preset is not None:
            raise FileNotFoundError(f"{caller}: no model file at {path} (preset {preset.name})")
        hint = ""
        if not path.suffix and len(path.parts) == 1:  # a bare word: a preset name mistyped?
            names = ", ".join(p.name for p in presets.every())
            hint = f"; nor is {str(name_or_path)!r} a preset ({names})"
        raise FileNotFoundError(f"{caller}: no model file at {path}{hint}")
    return preset, path


def _read_model_file(path: Path) -> dict:
    """The checked top level of a model file (``ValueError`` if it is not one of this version)."""
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"load_model: {path} is not a PQ-MIM model file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("kind") != _FILE_KIND:
        raise ValueError(f"load_model: {path} is not a PQ-MIM model file")
    version = blob.get("version")
    if version != _FILE_VERSION:
        raise ValueError(
            f"load_model: {path} is a model file of version {version}; this release reads "
            f"version {_FILE_VERSION} (entropy model v2, .pqm format 3). A version-1 file's "
            "PQ-VAE can be reused: pqmim train --init-from FILE trains a new entropy model for it"
        )
    return blob


def load_variants(name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> dict:
    """Every variant a model file holds, ``{name: PQMIM}`` (eval mode; empty if none), each
    loaded and checked as ``load_model(..., variant=name)`` does. ``name_or_path`` as for
    :func:`load_model`; a preset that is itself a variant names its file. Pass them to
    :func:`save_model` (``variants=``) when rewriting the file with a model whose encoder,
    quantizer and entropy model did not change, so that the files they wrote keep decoding."""
    _, path = _model_path(name_or_path, "load_variants")
    blob = _read_model_file(path)  # once, for every variant
    held = blob.get("variants") or {}
    return {name: _model_from_blob(blob, path, name).to(device).eval() for name in sorted(held)}


def _stored_perceptual(blob: dict, config: PQMIMConfig, path) -> torch.nn.Module:
    """The perceptual decoder a model file holds (eval mode, fp32); ``ValueError`` if damaged."""
    from pqmim_kernels.models.config import check_block_counts
    from pqmim_kernels.models.pqvae import Decoder

    blocks = blob.get("perceptual_decoder_blocks", config.decoder_extra_blocks)
    int8 = "perceptual_decoder_q" in blob
    try:  # files before the key was written: the MSE decoder's size
        dec = Decoder.from_config(config, check_block_counts(tuple(blocks), "extra blocks"))
        if int8:
            state = _from_int8_rows(blob["perceptual_decoder_q"])
        else:
            state = {k: v.float() for k, v in blob["perceptual_decoder"].items()}
        dec.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        why = str(exc).strip().splitlines()[0].rstrip(":")  # torch lists every key after it
        raise ValueError(
            f"load_model: the perceptual decoder in {path} does not load ({why}): the file is "
            "damaged"
        ) from exc
    setattr(dec, STORED_INT8, int8)
    return dec.eval()


def _aliases(stored, path) -> tuple[bytes, ...]:
    """The model ids a file lists under "aliases" (hex strings of 2 bytes), as bytes."""
    try:
        out = tuple(bytes.fromhex(a) for a in stored)
    except (TypeError, ValueError):
        out = ()
    if not isinstance(stored, list) or len(out) != len(stored) or any(len(a) != 2 for a in out):
        raise ValueError(
            f"load_model: {path} lists malformed model-id aliases: the file is damaged"
        )
    return out


@functools.lru_cache(maxsize=8)
def _cached_model(path: str, stamp: int, device: str, variant: str) -> PQMIM:
    return load_model(path, device=device, variant=variant or None)


def preset_model(preset: presets.Preset, device: str = "cpu") -> PQMIM:
    """The preset's model on ``device``, loaded once per process and shared by every caller
    (a rewritten file is loaded again); :func:`load_model` loads a fresh copy."""
    try:
        stamp = preset.path.stat().st_mtime_ns
    except OSError:
        return load_model(preset.name, device=device)  # raises, naming the preset
    return _cached_model(str(preset.path), stamp, device, preset.variant)


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {img.shape}")
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:
        img = img.copy()  # torch.from_numpy warns on read-only arrays (e.g. from Pillow)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def compress_image(
    img: np.ndarray,
    model: PQMIM | None = None,
    *,
    stages: int | None = None,
    max_bytes: int | None = None,
    downscale: bool = True,
    rate_lambda: float = 0.0,
    rate_search: bool = True,
    latent_steps: int = 0,
    progress: bool = False,
) -> bytes:
    """uint8 (H, W, 3) RGB -> ``.pqm`` bytes.

    ``model``: the model to code with; None: the default preset (:data:`presets.DEFAULT_PRESET`,
    cached), or with ``max_bytes`` every preset (:func:`compress_to_fit`).
    ``stages``: send only the first N coding stages (default: all); see :meth:`PQMIM.compress`.
    ``max_bytes``: instead, send the most stages whose whole file fits in this many bytes
    (PQMIM.md §7: a byte budget picks the stop stage; the decoder fills the rest). Raises
    ``ValueError`` if even the first stage does not fit.
    ``rate_lambda`` >= 0: rate-aware code assignment (:meth:`PQMIM.encode_codes`; 0 = nearest
    codewords), also for every file the ``max_bytes`` search tries. ``rate_search``: see
    :func:`compress_to_fit`. ``latent_steps`` N > 0: decoder-aware latent optimisation
    (:meth:`PQMIM.compress`; N decoder passes per model tried, ``progress`` shows a bar).
    """
    x = _as_tensor(img)
    lam = check_rate_lambda(rate_lambda)
    if max_bytes is None:
        return (model or preset_model(presets.default())).compress(
            x, stages=stages, rate_lambda=lam, latent_steps=latent_steps, progress=progress
        )
    if stages is not None:
        raise ValueError("compress_image: give stages or max_bytes, not both")
    fit = compress_to_fit(
        img,
        max_bytes,
        downscale=downscale,
        rate_lambda=lam,
        rate_search=rate_search,
        model=model,
        latent_steps=latent_steps,
        progress=progress,
    )
    return fit.data


def _check_budget(max_bytes) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"compress_image: max_bytes must be a positive int, got {max_bytes!r}")


class _Encodings:
    """One image's latents per (model, downscale), encoded once (``latent_steps`` > 0: and
    optimised once, :func:`~pqmim_kernels.models.latent_opt.optimize_latent`), however many
    files a budget search codes from them. ``x``: (1, 3, H, W) float in [0, 1]."""

    def __init__(self, x: torch.Tensor, latent_steps: int = 0, progress: bool = False) -> None:
        from pqmim_kernels.models.latent_opt import check_latent_steps

        self.x, self.steps, self.progress = x, check_latent_steps(latent_steps), progress
        self.size = (int(x.shape[2]), int(x.shape[3]))
        self._latents: dict[tuple[int, int], torch.Tensor] = {}

    def latent(self, model: PQMIM, downscale: int = 0) -> torch.Tensor:
        """(h, w, D): the latent ``model`` sends for the image shrunk ``2**downscale``."""
        from pqmim_kernels.models.codec import shrink

        key = (id(model), downscale)
        if key not in self._latents:
            x = shrink(self.x, downscale).to(model._device())
            self._latents[key] = model._latent(x, self.steps, self.progress)[0]
        return self._latents[key]

    def compress(self, model: PQMIM, downscale: int = 0, lam: float = 0.0) -> bytes:
        """The complete file: :meth:`PQMIM.compress` of the image, from the cached latent."""
        latent = self.latent(model, downscale)
        return model.compress_latent(latent, self.size, downscale=downscale, rate_lambda=lam)

    def codes(self, model: PQMIM, downscale: int = 0, lam: float = 0.0) -> torch.Tensor:
        """(h, w, M) int64: :meth:`PQMIM.encode_codes` of the image, from the cached latent."""
        return model.assign(self.latent(model, downscale)[None], lam)[0]


def _fit_stages(
    model: PQMIM,
    enc: _Encodings,
    max_bytes: int,
    full_size: int,
    downscale: int = 0,
    rate_lambda: float = 0.0,
) -> tuple[bytes | None, int, int]:
    """The most stages short of all whose file fits in ``max_bytes`` (the complete file, of
    ``full_size`` bytes, does not): ``(data or None, stages, bytes of the smallest file tried)``.

    File size grows with the stages sent: binary search, the image encoded once."""
    size = enc.size
    codes = enc.codes(model, downscale, rate_lambda)
    lo, hi, best, sent, smallest = 1, model.config.stages - 1, None, 0, full_size
    while lo <= hi:
        mid = (lo + hi) // 2
        data = model.compress_codes(codes, size, stages=mid, downscale=downscale)
        if len(data) <= max_bytes:
            best, sent, lo = data, mid, mid + 1
        else:
            hi, smallest = mid - 1, len(data)
    return best, sent, smallest if best is None else len(best)


class BudgetFit(NamedTuple):
    """What :func:`compress_to_fit` chose: the file, the model and preset that made it (None
    for a model given as ``model=``), the number of coding stages it holds and the rate lambda
    its codes were chosen with (:meth:`PQMIM.encode_codes`)."""

    data: bytes
    model: PQMIM
    preset: presets.Preset | None
    stages_sent: int
    rate_lambda: float = 0.0


def compress_to_fit(
    img: np.ndarray,
    max_bytes: int,
    candidates: Sequence[presets.Preset] | None = None,
    *,
    device: str = "cpu",
    downscale: bool = True,
    rate_lambda: float = 0.0,
    rate_search: bool = True,
    model: PQMIM | None = None,
    latent_steps: int = 0,
    progress: bool = False,
) -> BudgetFit:
    """The file within ``max_bytes`` bytes that codes the most of the image, over presets and
    stages (``candidates``: default every preset of the registry; ``model``: this model alone
    instead); ``downscale=False`` leaves out the downscaled files (only full-resolution files,
    complete or partial).

    The rule: a **complete** file (all stages) of the **highest quality** that fits; if no
    complete file fits, the better (by the PSNR of its decode, greedy fill) of two files: the
    **partial** file that codes the most tokens of the image, over every candidate and stage
    count (ties: the higher quality), and the **complete file of a downscaled image** (the
    least downscale, then the highest quality, that fits; PQM_FORMAT.md "Downscale"). When
    neither exists, a partial file of the 8x downscaled image: of the candidate that codes the
    most tokens, the stage count that fits whose decode has the highest PSNR (that little
    information makes the greedy fill erratic: more stages can decode worse). Why
    complete files first: the decoder fills unsent tokens with predicted codes, which costs far
    more than a step down in quality (the first default model on Kodak: 23.6 dB with all 10
    stages, 18.5 dB with 8). With ``rate_search`` (default), when no complete file fits at
    ``rate_lambda``, complete full-resolution files at larger rate lambdas
    (:data:`BUDGET_LAMBDAS`, rate-aware assignment: fewer bytes for a little distortion) join
    that competition: of each candidate, the smallest lambda of the grid whose file fits. Search
    order: complete files from the best quality down, stopping
    at the first that fits (one compression per candidate tried); only if none fits, for each
    candidate the most stages that fit (binary search; the image is encoded once per model),
    then complete downscaled files, then (``rate_search``) per candidate a binary search over
    the lambdas.

    Raises ``ValueError`` if even one coding stage of every candidate at 8x downscale is over
    the budget. ``rate_lambda``: the rate-aware assignment of every file tried
    (:meth:`PQMIM.encode_codes`). ``latent_steps``: decoder-aware latent optimisation
    (:meth:`PQMIM.compress`), once per candidate model and downscale the search tries (each
    latent is cached, however many stage counts and lambdas are coded from it).
    """
    _check_budget(max_bytes)
    lam = check_rate_lambda(rate_lambda)
    enc = _Encodings(_as_tensor(img), latent_steps, progress)
    if model is not None:
        if candidates is not None:
            raise ValueError("compress_to_fit: give candidates or model, not both")
        return _fit(enc, max_bytes, [(None, model)], downscale, lam, rate_search)
    order = sorted(candidates or presets.registry(), key=lambda p: p.quality, reverse=True)
    models = [(preset, preset_model(preset, device)) for preset in order]
    return _fit(enc, max_bytes, models, downscale, lam, rate_search)


# Rate lambdas a byte budget may use for complete files (rate_search): on held-out photos
# with the default model, 0.002 costs ~0.05 dB for ~10 % fewer bits, 0.02 ~1.2 dB for ~32 %.
BUDGET_LAMBDAS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064)


def _fit(
    enc: _Encodings,
    max_bytes: int,
    entries,
    downscale: bool = True,
    lam: float = 0.0,
    rate_search: bool = True,
) -> BudgetFit:
    """:func:`compress_to_fit`'s rule over ``entries``: ``(preset or None, model)`` pairs, best
    quality first; ``lam``: the rate-aware assignment of every file."""
    from pqmim_kernels.coding.pqm_format import MAX_DOWNSCALE
    from pqmim_kernels.models.schedule import stage_bounds

    loaded = []
    x = enc.x
    for preset, model in entries:
        data = enc.compress(model, 0, lam)
        if len(data) <= max_bytes:
            return BudgetFit(data, model, preset, model.config.stages, lam)
        loaded.append((preset, model, len(data)))

    def most_tokens(downscale: int):
        best, best_tokens, smallest = None, -1, None
        for preset, model, full in loaded:  # best quality first: a tie keeps the higher one
            if downscale:
                full = len(enc.compress(model, downscale, lam))
            data, sent, size = _fit_stages(model, enc, max_bytes, full, downscale, lam)
            if data is None:
                if smallest is None or size < smallest[0]:
                    smallest = (size, preset)
                continue
            h, w = _coded_tokens(data)
            coded = int(stage_bounds(h * w, model.config.stages)[sent])
            if coded > best_tokens:
                best, best_tokens = BudgetFit(data, model, preset, sent, lam), coded
        return best, smallest

    partial, smallest = most_tokens(0)
    shrunk = _fit_downscaled(loaded, enc, max_bytes, lam) if downscale else None
    rated = _fit_lambdas(loaded, enc, max_bytes, lam) if rate_search else []
    found = [fit for fit in (shrunk, partial, *rated) if fit is not None]
    if len(found) > 1:  # ties: the first (shrunk, partial, then rated best quality first)
        return max(found, key=lambda fit: _fit_psnr(fit, x))
    if found:
        return found[0]
    how = ""
    if downscale:  # last resort: part of the 8x shrunk image
        partial, smallest = most_tokens(MAX_DOWNSCALE)
        how = f" with the image shrunk {1 << MAX_DOWNSCALE}x"
        if partial is not None:
            partial = _best_decoded_stages(partial, enc, MAX_DOWNSCALE, lam)
    if partial is None:
        size, preset = smallest
        what = f"preset {preset.label()}" if preset is not None else "the model"
        raise ValueError(
            f"nothing fits in max_bytes={max_bytes}: the smallest file, one coding stage of "
            f"{what}{how}, is {size} bytes"
        )
    return partial


def _fit_lambdas(loaded, enc: _Encodings, max_bytes: int, lam: float) -> list[BudgetFit]:
    """Per candidate (best quality first), the complete full-resolution file at the smallest
    lambda of :data:`BUDGET_LAMBDAS` above ``lam`` that fits (binary search: file size falls
    as lambda grows), for those where one does."""
    grid = [v for v in BUDGET_LAMBDAS if v > lam]
    out = []
    for preset, model, _ in loaded:
        lo, hi, best = 0, len(grid) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            data = enc.compress(model, 0, grid[mid])
            if len(data) <= max_bytes:
                best, hi = BudgetFit(data, model, preset, model.config.stages, grid[mid]), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            out.append(best)
    return out


def _coded_tokens(data: bytes) -> tuple[int, int]:
    """The token grid ``(h, w)`` a ``.pqm`` file codes (its coded size over 16)."""
    from pqmim_kernels.coding import pqm_format
    from pqmim_kernels.models.codec import DOWNSAMPLING

    ch, cw = pqm_format.unpack(data)[0].coded_size
    return -(-ch // DOWNSAMPLING), -(-cw // DOWNSAMPLING)


def _fit_downscaled(loaded, enc: _Encodings, max_bytes: int, lam: float) -> BudgetFit | None:
    """The complete file of the least downscaled image, best quality first, within the budget."""
    from pqmim_kernels.coding.pqm_format import MAX_DOWNSCALE

    for k in range(1, MAX_DOWNSCALE + 1):
        for preset, model, _ in loaded:
            data = enc.compress(model, k, lam)
            if len(data) <= max_bytes:
                return BudgetFit(data, model, preset, model.config.stages, lam)
    return None


def _best_decoded_stages(
    fit: BudgetFit, enc: _Encodings, downscale: int, lam: float = 0.0
) -> BudgetFit:
    """Of the files of ``fit``'s model with 1 .. ``fit.stages_sent`` stages of the image shrunk
    ``2**downscale`` (all within the budget: fewer stages, fewer bytes), the one whose decode
    (greedy fill) has the highest PSNR; ties keep more stages. With so little sent the greedy
    fill is erratic (a 3840x2560 photo at 8x: 11.8 dB from 1 stage, 8.6 dB from 2, 13.6 from 3),
    and decoding the <= 1,024 tokens of an 8x-shrunk image is cheap."""
    model, x, size = fit.model, enc.x, enc.size
    codes = enc.codes(model, downscale, lam)
    best, best_psnr = fit, _fit_psnr(fit, x)
    for stages in range(fit.stages_sent - 1, 0, -1):
        data = model.compress_codes(codes, size, stages=stages, downscale=downscale)
        candidate = BudgetFit(data, model, fit.preset, stages, lam)
        psnr = _fit_psnr(candidate, x)
        if psnr > best_psnr:
            best, best_psnr = candidate, psnr
    return best


def _fit_psnr(fit: BudgetFit, x: torch.Tensor) -> float:
    """PSNR (dB) of a candidate file's decode (greedy fill) against the image ``x``."""
    y = fit.model.decompress(fit.data).cpu()
    mse = float(((y * 255).round() / 255 - x).pow(2).mean())
    return float("inf") if mse == 0 else -10.0 * float(np.log10(mse))


def decompress_image(data: bytes, model: PQMIM | None = None, **fill_options) -> np.ndarray:
    """``.pqm`` bytes -> uint8 (H, W, 3) RGB.

    ``model=None``: the preset whose model id the file's header names (the default preset is
    tried first; each preset is loaded once per process). Raises ``ValueError`` if no preset
    made the file. ``fill_options`` (``fill="sample"``, ``seed``, ``iterations``,
    ``temperature``): how a partial file's missing stages are filled, see
    :meth:`PQMIM.decompress_codes`; ``decoder="perceptual"``: the perceptual g_s.
    """
    x = (model or model_for_file(data)[0]).decompress(data, **fill_options)
    return (x[0].permute(1, 2, 0).cpu() * 255.0).round().to(torch.uint8).numpy()


def model_for_file(data: bytes, device: str = "cpu") -> tuple[PQMIM, presets.Preset]:
    """The preset (and its loaded model) that made the ``.pqm`` file ``data``, found by the
    model id in its header; the default preset is tried first, then by quality, then the
    retired ones.

    Raises ``ValueError`` for a file that is not a ``.pqm`` file or that no preset made (the
    message lists every preset's model id).
    """
    from pqmim_kernels.coding import pqm_format

    wanted = pqm_format.unpack(data)[0].model_id
    first = presets.default()
    tried = []
    for preset in (first, *(p for p in presets.every() if p != first)):
        model = preset_model(preset, device)
        if model.reads(wanted):
            return model, preset
        ids = (model.model_id(), *model.aliases)
        tried.append(" ".join([preset.name, *(i.hex() for i in ids)]))
    raise ValueError(
        f"this .pqm file was made by model {wanted.hex()}, which is none of the presets "
        f"({', '.join(tried)}); give the model file it was made with"
    )
