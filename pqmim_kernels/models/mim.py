"""The MIM conditional entropy model, v2 (PQMIM.md §3; ``.pqm`` format 3): the float model that
is trained, with quantisation-aware training and the export to the integer model that codes.

Structure (the integer spec, :mod:`pqmim_kernels.reference.int_mim`, says it precisely):

- Two token streams share the weights of ``depth`` pre-norm transformer blocks. The *known
  stream* embeds a token's M sub-codes (sum of M tables); the *query stream* starts from a learned
  [MASK] vector. A token of coding stage ``s`` attends, in the known stream, to known-stream keys
  of stages ``<= s`` and, in the query stream, to those of stages ``< s``; so known keys are
  computed once per token and cached by the decoder (stage-causal caching), and training sees
  exactly the contexts met while coding: one forward pass gives the rate of every token of a
  window under the real coding schedule (teacher forcing).
- Attention is local (a ``(2R+1)^2`` window of grid offsets) with a learned bias per head and
  offset instead of position embeddings: translation invariant, any grid size, linear cost.
- Norms are RMS norms without gain (the next matrix absorbs it); MLPs use GELU.
- The head codes a token's sub-codes in sub-space order: sub-code ``m`` sees the query output,
  a step vector and embeddings of sub-codes ``< m`` of the same token (``head_depth`` residual
  MLP blocks, then one output matrix per sub-space).

Quantisation-aware training: :meth:`MIMEntropyModel.calibrate` records activation ranges,
:meth:`MIMEntropyModel.set_qat` switches on fake quantisation (straight-through gradients) at
exactly the points where the integer model rounds, and :meth:`MIMEntropyModel.export_int` writes
the integer tensors (int8 weights per output channel, multipliers and shifts, integer tables).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pqmim_kernels.reference import int_mim as im

__all__ = ["MIMEntropyModel", "mim_bits", "stage_grid"]

_LOG2E = 1.0 / math.log(2.0)
_LOGIT_UNIT = _LOG2E * (1 << im.LOG_BITS)  # integer logit units per nat
_RES_SCALE = 1.0 / (1 << im.RES_BITS)
_RES_MAX = im.RES_LIMIT * _RES_SCALE
_CALIB_QUANTILE = 1e-4  # calibrated range: the largest |x| but the top 0.01 %


def stage_grid(h: int, w: int, stages: int, device=None) -> torch.Tensor:
    """Coding stage of every position of an ``h × w`` grid: int64 (h*w,) (raster order)."""
    from pqmim_kernels.models.schedule import stage_of_position

    return torch.from_numpy(stage_of_position(h, w, stages)).to(device)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, gradient of the identity (straight-through)."""
    return x + (q - x).detach()


def _fake_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ste(x, torch.clamp(torch.round(x / scale), -127, 127) * scale)


def _fake_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantisation of a (Dout, Din) weight."""
    s = _weight_scale(w.detach())[:, None]
    return _ste(w, torch.clamp(torch.round(w / s), -127, 127) * s)


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1) / 127.0
    return torch.where(s > 0, s, torch.ones_like(s))


def _fake_res(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.round(x.clamp(-_RES_MAX, _RES_MAX) / _RES_SCALE) * _RES_SCALE)


def _rms(x: torch.Tensor) -> torch.Tensor:
    ms = x.float().pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(ms.clamp_min(_RES_SCALE * _RES_SCALE))


def _window_pairs(h: int, w: int, radius: int, device=None):
    """Dense window structure of an h×w grid: (n, n) bool ``inside`` and (n, n) int64 index of
    the offset ``(dy + R) * (2R+1) + (dx + R)`` (0 outside the window)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = ys[None, :] - ys[:, None]
    dx = xs[None, :] - xs[:, None]
    inside = (dy.abs() <= radius) & (dx.abs() <= radius)
    idx = (dy + radius) * (2 * radius + 1) + (dx + radius)
    return inside, torch.where(inside, idx, 0)


def _multiplier(ratio: float, bits: int = im.MULT_BITS) -> tuple[int, int]:
    """``(mult, shift)`` with ``mult / 2^shift ~= ratio``, ``mult`` in ``[2^(bits-1), 2^bits)``
    when possible, ``1 <= shift <= 62``."""
    if not ratio > 0 or not math.isfinite(ratio):
        return 0, 1
    shift = bits - 1 - math.floor(math.log2(ratio))
    mult = round(ratio * 2.0**shift)
    if mult >= 1 << bits:
        shift -= 1
        mult = round(ratio * 2.0**shift)
    if shift > 62:
        shift = 62
        mult = round(ratio * 2.0**shift)
    if shift < 1:
        raise ValueError(f"integer export: rescale factor {ratio:.3g} is too large")
    return int(mult), int(shift)


class _Sites:
    """Activation ranges of the points where the integer model rounds to int8."""

    def __init__(self) -> None:
        self.observe: dict[str, list[float]] | None = None

    def record(self, name: str, x: torch.Tensor) -> None:
        if self.observe is None:
            return
        a = x.detach().abs().flatten().float()
        k = max(1, int(a.numel() * _CALIB_QUANTILE))
        self.observe.setdefault(name, []).append(float(a.topk(k).values[-1]))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, radius: int) -> None:
        super().__init__()
        self.heads, self.radius = heads, radius
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.bias = nn.Parameter(torch.zeros(heads, 2 * radius + 1, 2 * radius + 1))
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)


class _HeadMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)


class MIMEntropyModel(nn.Module):
    """Float (trainable) entropy model v2; see the module docstring.

    Args:
        num_subspaces: M; codebook_size: K; width: W; depth: transformer blocks; heads;
        mlp_ratio: block MLP width / W; radius: R of the attention window (<= 8);
        head_depth: residual MLP blocks of the sub-code head; head_mlp_ratio: their width / W.
        condition: condition sub-code ``m`` on the sub-codes ``< m`` of its token (False: the
            sub-codes are independent given the context, the ablation of PQMIM.md §3's default;
            the conditioning tables are then zero and frozen).
    """

    def __init__(
        self,
        num_subspaces: int,
        codebook_size: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 3.0,
        radius: int = 7,
        head_depth: int = 1,
        head_mlp_ratio: float = 2.0,
        condition: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= radius <= im.MAX_RADIUS:
            raise ValueError(f"MIMEntropyModel: radius must be in [0, {im.MAX_RADIUS}]")
        if width % heads:
            raise ValueError(f"MIMEntropyModel: width {width} is not a multiple of heads {heads}")
        hidden = max(1, round(width * mlp_ratio))
        head_hidden = max(1, round(width * head_mlp_ratio))
        for name, v in (("width", width), ("MLP width", hidden), ("head MLP width", head_hidden)):
            if v > im.MAX_INNER:
                raise ValueError(f"MIMEntropyModel: {name} {v} > {im.MAX_INNER} (exact GEMMs)")
        m, k = num_subspaces, codebook_size
        self.num_subspaces, self.codebook_size, self.width = m, k, width
        self.depth, self.heads, self.radius, self.head_depth = depth, heads, radius, head_depth
        self.code_embedding = nn.Embedding(m * k, width)
        self.mask_embedding = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(_Block(width, heads, hidden, radius) for _ in range(depth))
        self.cond_embedding = nn.Embedding(max(m - 1, 1) * k, width)
        self.step_embedding = nn.Parameter(torch.zeros(m, width))
        self.head = nn.ModuleList(_HeadMLP(width, head_hidden) for _ in range(head_depth))
        self.out = nn.Linear(width, m * k)
        for emb in (self.code_embedding, self.cond_embedding):
            nn.init.normal_(emb.weight, std=0.02)
        self.condition = bool(condition)
        if not self.condition:
            nn.init.zeros_(self.cond_embedding.weight)
            self.cond_embedding.weight.requires_grad_(False)
        nn.init.normal_(self.mask_embedding, std=0.02)
        nn.init.normal_(self.step_embedding, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("_offsets", torch.arange(m) * k, persistent=False)
        # Calibrated activation scales (0 = not calibrated) and the QAT switch, saved with the
        # model so that a resumed run keeps its quantisation grid.
        self.register_buffer("qat_scales", torch.zeros(self._num_sites()))
        self.register_buffer("qat_enabled", torch.tensor(False))
        self._sites = _Sites()
        self._grid_cache: dict = {}

    # ---- quantisation sites --------------------------------------------------------------------

    def _site_names(self) -> list[str]:
        names = []
        for i in range(self.depth):
            names += [f"blocks.{i}.{s}" for s in ("norm1", "q", "k", "v", "norm2", "h", "g")]
        for i in range(self.head_depth):
            names += [f"head.{i}.{s}" for s in ("norm", "h", "g")]
        return [*names, "out.norm"]

    def _num_sites(self) -> int:
        return 7 * self.depth + 3 * self.head_depth + 1

    def _scale(self, name: str) -> float:
        return float(self.qat_scales[self._site_index[name]])

    @property
    def _site_index(self) -> dict[str, int]:
        idx = getattr(self, "_site_index_cache", None)
        if idx is None:
            idx = {n: i for i, n in enumerate(self._site_names())}
            self._site_index_cache = idx
        return idx

    def _act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """An int8 rounding point: record (calibration), fake-quantise (QAT) or pass."""
        self._sites.record(name, x)
        if bool(self.qat_enabled):
            return _fake_int8(x, self._scale(name))
        return x

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._act(name, _rms(x))

    def _res(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_res(x) if bool(self.qat_enabled) else x

    def _lin(self, lin: nn.Linear, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        w, b = lin.weight, lin.bias
        if rows is not None:
            w, b = w[rows], b[rows]
        if bool(self.qat_enabled):
            w = _fake_weight(w)
        return F.linear(x, w, b)

    def _table(self, emb: torch.Tensor) -> torch.Tensor:
        return _fake_res(emb) if bool(self.qat_enabled) else emb

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Set the activation scales from the ranges seen on ``batches`` (an iterable of
        ``(codes (B, h, w, M), stages (h*w,))``): the largest |x| but the top 0.01 % per site,
        averaged over batches. Norm outputs get power-of-two scales (the integer norm's
        format). Leaves QAT off; call :meth:`set_qat` next."""
        was = bool(self.qat_enabled)
        self.qat_enabled.fill_(False)
        self._sites.observe = {}
        try:
            for codes, stages in batches:
                self(codes, stages)
            seen = self._sites.observe
        finally:
            self._sites.observe = None
        for name, i in self._site_index.items():
            if name not in seen:
                raise RuntimeError(f"MIMEntropyModel.calibrate: site {name} was never reached")
            rng = max(sum(seen[name]) / len(seen[name]), 1e-6)
            if name.endswith("norm") or name.endswith("norm1") or name.endswith("norm2"):
                exponent = min(7, max(0, math.floor(math.log2(127.0 / rng))))
                self.qat_scales[i] = 2.0**-exponent
            else:
                self.qat_scales[i] = rng / 127.0
        self.qat_enabled.fill_(was)

    def set_qat(self, enabled: bool = True) -> None:
        """Switch fake quantisation on (needs :meth:`calibrate` first) or off."""
        if enabled and not bool((self.qat_scales > 0).all()):
            raise RuntimeError("MIMEntropyModel.set_qat: calibrate() the model first")
        self.qat_enabled.fill_(bool(enabled))

    def _score_scale(self, i: int) -> float:
        """Scale of q.k in the float model: 1/sqrt(Dh), or under QAT exactly the integer model's
        ``score_mult / 2^score_shift`` expressed in nats per (int q . int k) unit."""
        dh = self.width // self.heads
        if not bool(self.qat_enabled):
            return 1.0 / math.sqrt(dh)
        sq, sk = self._scale(f"blocks.{i}.q"), self._scale(f"blocks.{i}.k")
        mult, shift = self._score_multiplier(i)
        return mult / 2.0**shift / _LOGIT_UNIT / (sq * sk)

    def _score_multiplier(self, i: int) -> tuple[int, int]:
        dh = self.width // self.heads
        sq, sk = self._scale(f"blocks.{i}.q"), self._scale(f"blocks.{i}.k")
        ratio = sq * sk / math.sqrt(dh) * _LOGIT_UNIT
        mult, shift = _multiplier(ratio, bits=11)
        if shift > 40:
            mult, shift = round(ratio * 2.0**40), 40
        return max(1, mult), shift

    # ---- forward (training) --------------------------------------------------------------------

    def _grid(self, h: int, w: int, device):
        key = (h, w, str(device))
        if key not in self._grid_cache:
            if len(self._grid_cache) > 16:
                self._grid_cache.clear()
            self._grid_cache[key] = _window_pairs(h, w, self.radius, device)
        return self._grid_cache[key]

    def _bias(self, i: int, bias_idx: torch.Tensor) -> torch.Tensor:
        """The learned offset bias of block ``i`` gathered for every pair: (H, n, n) nats."""
        bias = self.blocks[i].bias.reshape(self.heads, -1)[:, bias_idx]
        if bool(self.qat_enabled):  # the integer model's bias grid (2^-16 bits)
            bias = _ste(bias, torch.round(bias * _LOGIT_UNIT) / _LOGIT_UNIT)
        return bias

    def _attention(self, i, q, k, v, bias, hidden, has_key):
        """q (B, n, W), k/v (B, n, W); bias (H, n, n); hidden (n, n) bool; has_key (n,) bool
        (rows without any visible key give 0, never NaN) -> (B, n, W)."""
        b, n, width = q.shape
        heads, dh = self.heads, width // self.heads
        q = q.view(b, n, heads, dh).transpose(1, 2)
        k = k.view(b, n, heads, dh).transpose(1, 2)
        v = v.view(b, n, heads, dh).transpose(1, 2)
        s = torch.matmul(q, k.transpose(-1, -2)) * self._score_scale(i)
        s = (s + bias).masked_fill(hidden, -1e9)  # finite: hidden-only rows stay finite
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)
        o = torch.matmul(p, v) * has_key[None, None, :, None]
        return o.transpose(1, 2).reshape(b, n, width)

    def forward(self, codes: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every token of code windows.

        Args:
            codes: (B, h, w, M) int64 codes in [0, K).
            stages: (h*w,) int64 coding stage of each raster position (e.g. :func:`stage_grid`).

        Returns:
            (B, h*w, M, K) float32 logits (nats): row ``(b, i, m)`` is the distribution of
            sub-code ``m`` of token ``i`` given the tokens of earlier stages and sub-codes
            ``< m`` of token ``i``, as the integer model computes it while coding.
        """
        b, h, w, m = codes.shape
        if m != self.num_subspaces:
            raise ValueError(
                f"MIMEntropyModel: codes must have M={self.num_subspaces} sub-codes, got {m}"
            )
        if stages.shape != (h * w,):
            raise ValueError(
                f"MIMEntropyModel: stages must be ({h * w},), got {tuple(stages.shape)}"
            )
        n, width = h * w, self.width
        flat = codes.reshape(b, n, m)
        inside, bias_idx = self._grid(h, w, codes.device)
        st = stages.to(codes.device)
        hide_known = ~(inside & (st[None, :] <= st[:, None]))
        hide_query = ~(inside & (st[None, :] < st[:, None]))
        key_known, key_query = ~hide_known.all(-1), ~hide_query.all(-1)
        emb = self._table(self.code_embedding.weight)
        xk = self._res(F.embedding_bag((flat + self._offsets).reshape(b * n, m), emb, mode="sum"))
        xk = xk.view(b, n, width)
        xq = self._table(self.mask_embedding).expand(b, n, width)
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            qkv = self._lin(blk.qkv, self._norm(f"{p}.norm1", xk))
            qk = self._act(f"{p}.q", qkv[..., :width])
            kk = self._act(f"{p}.k", qkv[..., width : 2 * width])
            vk = self._act(f"{p}.v", qkv[..., 2 * width :])
            yq = self._norm(f"{p}.norm1", xq)
            qq = self._act(f"{p}.q", self._lin(blk.qkv, yq, slice(0, width)))
            bias = self._bias(i, bias_idx)
            ok = self._act(f"{p}.v", self._attention(i, qk, kk, vk, bias, hide_known, key_known))
            oq = self._act(f"{p}.v", self._attention(i, qq, kk, vk, bias, hide_query, key_query))
            xk = self._block_rest(i, xk, ok)
            xq = self._block_rest(i, xq, oq)
        return self._head(xq, flat)

    def _block_rest(self, i: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        blk, p = self.blocks[i], f"blocks.{i}"
        x = self._res(x + self._lin(blk.proj, o))
        hdn = self._act(f"{p}.h", self._lin(blk.fc1, self._norm(f"{p}.norm2", x)))
        g = self._act(f"{p}.g", F.gelu(hdn))
        return self._res(x + self._lin(blk.fc2, g))

    def _head(self, xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """xq (B, n, W), codes (B, n, M) -> logits (B, n, M, K)."""
        b, n, m = codes.shape
        k = self.codebook_size
        cond = self._table(self.cond_embedding.weight)
        z = xq[:, :, None, :] + self._table(self.step_embedding)  # (B, n, M, W)
        if m > 1:
            offs = self._offsets[: m - 1]
            e = cond[codes[..., : m - 1] + offs]  # (B, n, M-1, W): embedding of sub-code j
            prefix = torch.cumsum(e, dim=2)  # sum over j < m lands in slot m
            z = torch.cat([z[:, :, :1], z[:, :, 1:] + prefix], dim=2)
        z = self._res(z)
        for i, blk in enumerate(self.head):
            p = f"head.{i}"
            hdn = self._act(f"{p}.h", self._lin(blk.fc1, self._norm(f"{p}.norm", z)))
            z = self._res(z + self._lin(blk.fc2, self._act(f"{p}.g", F.gelu(hdn))))
        y = self._norm("out.norm", z)  # (B, n, M, W)
        w = self.out.weight
        if bool(self.qat_enabled):
            w = _fake_weight(w)
        w = w.view(m, k, self.width)
        logits = torch.einsum("bnmw,mkw->bnmk", y, w) + self.out.bias.view(m, k)
        return logits.float()

    # ---- export to the integer model -------------------------------------------------------

    @torch.no_grad()
    def export_int(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The integer model: ``(tensors, meta)`` for :class:`~pqmim_kernels.reference.int_mim.
        IntMIM` (int8 weights per output channel; int64 biases, multipliers, shifts, tables).

        Needs calibrated scales (:meth:`calibrate`). Deterministic for given float weights; the
        result is stored in the model file, so every decoder reads the same integers.
        """
        if not bool((self.qat_scales > 0).all()):
            raise RuntimeError("MIMEntropyModel.export_int: calibrate() the model first")
        t: dict[str, torch.Tensor] = {}

        def table(x: torch.Tensor) -> torch.Tensor:
            v = torch.round(x.double() / _RES_SCALE).clamp(-(1 << 20), 1 << 20)
            return v.to(torch.int64)

        def linear(name, lin, s_in, s_out, rows=None):
            w = lin.weight.double()
            b = lin.bias.double()
            if rows is not None:
                w, b = w[rows], b[rows]
            sw = _weight_scale(w)
            t[f"{name}.w"] = torch.clamp(torch.round(w / sw[:, None]), -127, 127).to(torch.int8)
            acc_unit = s_in * sw
            t[f"{name}.b"] = torch.round(b / acc_unit).clamp(-(1 << 30), 1 << 30).to(torch.int64)
            ms = [_multiplier(float(u) / s) for u, s in zip(acc_unit, _per_row(s_out, len(sw)))]
            t[f"{name}.mult"] = torch.tensor([a for a, _ in ms], dtype=torch.int64)
            t[f"{name}.shift"] = torch.tensor([c for _, c in ms], dtype=torch.int64)

        def exponent(name) -> float:
            s = self._scale(name)
            e = round(-math.log2(s))
            t[name] = torch.tensor(e, dtype=torch.int64)
            return 2.0**-e

        def act(name, s_in, s_out):
            x = torch.arange(-127, 128, dtype=torch.float64) * s_in
            t[name] = torch.clamp(torch.round(F.gelu(x) / s_out), -127, 127).to(torch.int64)

        width = self.width
        t["code_embedding"] = table(self.code_embedding.weight)
        t["mask_embedding"] = table(self.mask_embedding)
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            s1 = exponent(f"{p}.norm1")
            sq, sk, sv = (self._scale(f"{p}.{c}") for c in "qkv")
            qkv_out = torch.tensor([sq] * width + [sk] * width + [sv] * width, dtype=torch.float64)
            linear(f"{p}.qkv", blk.qkv, s1, qkv_out)
            mult, shift = self._score_multiplier(i)
            t[f"{p}.score_mult"] = torch.tensor(mult, dtype=torch.int64)
            t[f"{p}.score_shift"] = torch.tensor(shift, dtype=torch.int64)
            bias = torch.round(blk.bias.double() * _LOGIT_UNIT).clamp(-(1 << 24) + 1, (1 << 24) - 1)
            t[f"{p}.bias"] = bias.to(torch.int64)
            linear(f"{p}.proj", blk.proj, sv, _RES_SCALE)
            s2 = exponent(f"{p}.norm2")
            sh, sg = self._scale(f"{p}.h"), self._scale(f"{p}.g")
            linear(f"{p}.fc1", blk.fc1, s2, sh)
            act(f"{p}.act", sh, sg)
            linear(f"{p}.fc2", blk.fc2, sg, _RES_SCALE)
        t["cond_embedding"] = table(self.cond_embedding.weight)
        t["step_embedding"] = table(self.step_embedding)
        for i, blk in enumerate(self.head):
            p = f"head.{i}"
            sn = exponent(f"{p}.norm")
            sh, sg = self._scale(f"{p}.h"), self._scale(f"{p}.g")
            linear(f"{p}.fc1", blk.fc1, sn, sh)
            act(f"{p}.act", sh, sg)
            linear(f"{p}.fc2", blk.fc2, sg, _RES_SCALE)
        so = exponent("out.norm")
        linear("out", self.out, so, 1.0 / _LOGIT_UNIT)
        meta = {
            "num_subspaces": self.num_subspaces,
            "codebook_size": self.codebook_size,
            "width": width,
            "depth": self.depth,
            "heads": self.heads,
            "radius": self.radius,
            "head_depth": self.head_depth,
        }
        return t, meta


def _per_row(s_out, n: int) -> list[float]:
    if isinstance(s_out, torch.Tensor):
        return [float(v) for v in s_out]
    return [float(s_out)] * n


def mim_bits(entropy_model: nn.Module, codes: torch.Tensor, stages: int) -> torch.Tensor:
    """Rate of code grids under the coding schedule: (B,) float32 bits per whole grid.

    ``entropy_model``: a :class:`MIMEntropyModel` (or its DDP wrapper); ``codes``: (B, h, w, M)
    int64. The stages are those of the real coding schedule for an ``h × w`` grid, so this is the
    float model's cross-entropy of exactly what the coder will code (the training loss).
    """
    b, h, w, m = codes.shape
    st = stage_grid(h, w, stages, codes.device)
    logits = entropy_model(codes, st)
    k = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, k), codes.reshape(-1), reduction="none")
    return ce.view(b, -1).sum(1) * _LOG2E
