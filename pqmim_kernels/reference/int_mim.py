"""Integer-exact inference of the MIM entropy model (entropy model v2, ``.pqm`` format 3): THE SPEC.

Every number that reaches the rANS coder is an integer computed by integer-exact operations, so an
encoder and a decoder agree bit for bit on any CPU (any ISA, thread count or BLAS) and on a GPU.
The float model in :mod:`pqmim_kernels.models.mim` exists only to be trained; it exports the
integer model below (:meth:`MIMEntropyModel.export_int`), which is what codes and decodes. This
file reads top to bottom: fixed-point formats, exact tables, primitives, the two token streams,
the sub-code head and the integer CDFs.

Fixed-point formats. Every value is an integer (int64 tensors unless said otherwise):

- **residual stream**: units of ``2^-RES_BITS`` (``RES_BITS = 10``), clamped to
  ``[-RES_LIMIT, RES_LIMIT]`` (``RES_LIMIT = 2^22 - 1``) after every addition;
- **activations** that enter a matrix product ("int8"): integers in ``[-127, 127]``; the real
  value is the integer times a per-tensor scale that the export folded into the weights;
- **weights**: int8 in ``[-127, 127]`` (one scale per output channel, folded into the output
  multiplier), **biases** in accumulator units, ``|b| <= 2^30``;
- **logits** (attention scores and output logits): units of ``2^-LOG_BITS`` *bits* (log2),
  ``LOG_BITS = 16``.

Rounding rule. Every rescale is :func:`round_shift`: ``(v + 2^(s-1)) >> s`` with an arithmetic
(flooring) shift, i.e. round half up; a rescale by a real factor ``r`` is ``round_shift(v * mult,
shift)`` with the integer multiplier ``mult = round(r * 2^shift)`` in ``[2^29, 2^30)`` chosen at
export time. Every product stays below ``2^62`` in magnitude (bounds at each step below).

Matrix products. :func:`int_matmul` multiplies int8-valued matrices with a float32 GEMM. With
``|a|, |w| <= 127`` and an inner dimension ``<= MAX_INNER = 1024`` every partial sum of any
summation order is an integer of magnitude ``<= 1024 * 127^2 = 16,516,096 < 2^24``, which float32
represents exactly, so the result is the exact integer whatever the BLAS, blocking, thread count,
FMA use or device (TF32 is switched off for the call on CUDA; it would be exact anyway, since
int8 values fit its 10-bit mantissa). ``tests/test_int_mim.py`` checks the worst case.

Nonlinearities without libm: the softmax exponential and the logits -> frequencies map use the
exact integer table :func:`exp2_table` (``floor(2^b * 2^(-j/256))``, computed by integer roots),
the MLP activation is a 255-entry integer table stored with the model, and the norm's square root
is an exact integer square root (:func:`isqrt`).

The entropy model (PQMIM.md §3, our extension of §3's "allowed extension"):

- Tokens of an ``h × w`` grid carry M sub-codes in ``[0, K)`` and a coding stage (schedule of
  :mod:`pqmim_kernels.models.schedule`). Two streams share the transformer weights:
  the **known stream** embeds a token's codes (sum of M tables) and lets it attend to the
  known-stream keys of tokens of the *same or earlier* stages; the **query stream** starts from the
  learned [MASK] vector and attends to known-stream keys of *earlier* stages only. Known keys are
  therefore computed once per token and cached (the decoder decodes stage ``s`` from the query
  stream, then runs the known stream on it), and the encoder computes both streams for all tokens
  in one pass each.
- Attention is local: a query at ``(y, x)`` sees the visible keys at ``(y+dy, x+dx)`` with
  ``|dy|, |dx| <= R`` (``R <= 8``), with a learned bias per head and offset (translation
  invariant, any grid size). Cost and memory are linear in the number of tokens.
- The head codes the M sub-codes of a token in sub-space order: sub-code ``m`` is predicted from
  the query-stream output plus a step vector and embeddings of the sub-codes ``< m`` of the same
  token, through residual MLP blocks and one output matrix per sub-space.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = [
    "ATT_EXP_BITS",
    "LOG_BITS",
    "MAX_INNER",
    "MAX_RADIUS",
    "PROB_EXP_BITS",
    "RES_BITS",
    "RES_LIMIT",
    "IntLinear",
    "IntMIM",
    "exp2_neg",
    "exp2_table",
    "int_matmul",
    "isqrt",
    "logits_to_cdfs",
    "rms_norm_int",
    "round_shift",
    "window_attention_int",
    "window_offsets",
]

RES_BITS = 10
RES_LIMIT = (1 << 22) - 1
LOG_BITS = 16
MAX_INNER = 1024
MAX_RADIUS = 8
ATT_EXP_BITS = 15  # softmax weights: e <= 2^15; 289 keys * 2^15 * 127 < 2^31
PROB_EXP_BITS = 30  # output probabilities before quantisation: e <= 2^30
MULT_BITS = 30  # multipliers in [2^29, 2^30)
_TABLE_INDEX_BITS = 8  # the exp table resolves 1/256 of a bit
_NEG = -(1 << 40)  # score of an invisible key (below every real score)


# ---- exact tables --------------------------------------------------------------------------


@functools.cache
def _exp2_values(bits: int) -> tuple[int, ...]:
    # floor(2^bits * 2^(-j/256)) = the largest v with v^256 <= 2^(256*bits - j): integer roots by
    # bisection on Python integers, so no floating point (and no libm) is involved.
    n = 1 << _TABLE_INDEX_BITS
    out = []
    for j in range(n):
        target = 1 << (n * bits - j)
        lo, hi = 1 << (bits - 1), (1 << bits) + 1  # lo^n <= target < hi^n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if mid**n <= target:
                lo = mid
            else:
                hi = mid
        out.append(lo)
    return tuple(out)


def exp2_table(bits: int, device=None) -> torch.Tensor:
    """int64 (256,): ``floor(2^bits * 2^(-j/256))`` for ``j = 0..255`` (entry 0 is ``2^bits``)."""
    if not 1 <= bits <= 40:
        raise ValueError(f"exp2_table: bits must be in [1, 40], got {bits}")
    return torch.tensor(_exp2_values(bits), dtype=torch.int64, device=device)


# ---- primitives -----------------------------------------------------------------------------


def round_shift(v: torch.Tensor, shift) -> torch.Tensor:
    """Round half up of ``v / 2^shift``: ``(v + 2^(shift-1)) >> shift`` (``shift = 0``: ``v``).

    ``v``: int64 tensor; ``shift``: int or int64 tensor broadcastable to ``v``, in [0, 62].
    """
    if isinstance(shift, int):
        return v if shift == 0 else (v + (1 << (shift - 1))) >> shift
    half = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp_min(0), 0)
    return (v + half) >> shift


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(sqrt(n))`` of int64 ``0 <= n < 2^52``.

    float64 holds ``n`` exactly and IEEE square roots are correctly rounded, so the estimate is off
    by at most one; the two integer corrections make the result exact even if it were not.
    """
    r = torch.sqrt(n.to(torch.float64)).to(torch.int64)
    r = r - (r * r > n).to(torch.int64)
    return r + ((r + 1) * (r + 1) <= n).to(torch.int64)


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` of int8-valued matrices: a (N, Din), w (Dout, Din) -> int64 (N, Dout).

    Requires ``|a|, |w| <= 127`` and ``Din <= MAX_INNER`` (see the module docstring for why a
    float32 GEMM is then exact on every backend); callers guarantee the ranges.
    """
    if a.shape[-1] > MAX_INNER:
        raise ValueError(f"int_matmul: inner dimension {a.shape[-1]} > MAX_INNER = {MAX_INNER}")
    af, wf = a.to(torch.float32), w.to(torch.float32)
    if a.is_cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out = af @ wf.T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    else:
        out = af @ wf.T
    return out.to(torch.int64)


def rms_norm_int(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """RMS norm of residual-stream rows to int8: ``clamp(round(x / r * 2^exponent), ±127)`` with
    ``r = max(1, isqrt(floor(sum(x^2) / W)))``.

    ``x``: (..., W) int64 with ``|x| <= RES_LIMIT < 2^22`` and ``W <= MAX_INNER``, so
    ``sum(x^2) < 2^54`` fits int64 and the mean is below ``2^44`` (exact in :func:`isqrt`);
    ``exponent`` in [0, 7], so ``|x * 2^(e+1)| < 2^30``. Returns int64 in [-127, 127]; rounding:
    ``floor((x * 2^(e+1) + r) / (2r))``, round half up.
    """
    width = x.shape[-1]
    ms = torch.div((x * x).sum(-1, keepdim=True), width, rounding_mode="floor")
    r = isqrt(ms).clamp_min(1)
    y = torch.div(x * (1 << (exponent + 1)) + r, 2 * r, rounding_mode="floor")
    return y.clamp(-127, 127)


def exp2_neg(d: torch.Tensor, table: torch.Tensor, bits: int) -> torch.Tensor:
    """``2^bits * 2^(-d / 2^LOG_BITS)`` for int64 ``d >= 0``, from the exact table of
    :func:`exp2_table` ``(bits)``: ``table[(d >> 8) & 255] >> (d >> 16)`` (0 once the shift passes
    ``bits``). Monotone non-increasing in ``d``; relative error below 2^(-1/256) - 1 = 0.27 %."""
    frac = (d >> (LOG_BITS - _TABLE_INDEX_BITS)) & ((1 << _TABLE_INDEX_BITS) - 1)
    whole = (d >> LOG_BITS).clamp(max=bits + 1)
    return table[frac] >> whole


def window_offsets(radius: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(2R+1)^2`` window offsets ``(dy, dx)``, dy-major: two int64 tensors."""
    r = torch.arange(-radius, radius + 1, device=device)
    return r.repeat_interleave(2 * radius + 1), r.repeat(2 * radius + 1)


def window_attention_int(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    q_limit: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_stage: torch.Tensor,
    grid: tuple[int, int],
    radius: int,
    score_mult: int,
    score_shift: int,
    bias: torch.Tensor,
    chunk: int = 512,
) -> torch.Tensor:
    """Local integer attention of queries over cached keys: the spec of the C++ kernel.

    Args:
        q: (Nq, H, Dh) int8-valued queries. ``q_pos``: (Nq,) int64 raster positions ``y*w + x``.
        q_limit: (Nq,) int64: a key is visible when its stage is ``< q_limit`` (query stream: the
            query's stage; known stream: its stage + 1).
        k_cache, v_cache: (h*w, H, Dh) int8-valued keys/values indexed by raster position (only
            visible entries are read). ``key_stage``: (h*w,) int64 stage of each position.
        grid: ``(h, w)``; radius: R; window ``|dy|, |dx| <= R`` inside the grid.
        score_mult, score_shift: ``z = round_shift(q.k * score_mult, score_shift)`` in units of
            ``2^-LOG_BITS`` bits, ``1 <= score_mult < 2^11`` (``|q.k| < 2^20``, so ``|q.k *
            score_mult| < 2^31``), plus ``bias[head, dy + R, dx + R]`` (int, ``|bias| < 2^24``).
        chunk: queries per block (bounds memory; the result does not depend on it).

    Returns (Nq, H, Dh) int64 in [-127, 127]: ``round(sum_j e_j v_j / sum_j e_j)`` (round half
    up, ``floor((2 num + den) / (2 den))``) with ``e_j = exp2_neg(zmax - z_j)`` over the visible
    keys, ``e <= 2^ATT_EXP_BITS``; 0 for a query with no visible key. ``|num| <= 289 * 2^15 * 127
    < 2^31`` (computed in float64, exact below 2^53).
    """
    h, w = grid
    nq, heads, dh = q.shape
    dev = q.device
    dy, dx = window_offsets(radius, dev)
    table = exp2_table(ATT_EXP_BITS, dev)
    bias_flat = bias.reshape(heads, -1).to(torch.int64)  # (H, Wn)
    out = torch.zeros(nq, heads, dh, dtype=torch.int64, device=dev)
    for lo in range(0, nq, chunk):
        hi = min(nq, lo + chunk)
        pos = q_pos[lo:hi]
        ky = torch.div(pos, w, rounding_mode="floor")[:, None] + dy
        kx = (pos % w)[:, None] + dx
        inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
        kpos = torch.where(inside, ky * w + kx, 0)  # (n, Wn)
        visible = inside & (key_stage[kpos] < q_limit[lo:hi, None])
        kg = k_cache[kpos].to(torch.float32)  # (n, Wn, H, Dh)
        s = torch.einsum("nhd,njhd->nhj", q[lo:hi].to(torch.float32), kg).to(torch.int64)
        z = round_shift(s * score_mult, score_shift) + bias_flat[None]
        vis = visible[:, None, :]  # (n, 1, Wn)
        z = torch.where(vis, z, _NEG)
        zmax = z.max(dim=-1, keepdim=True).values
        e = torch.where(vis, exp2_neg((zmax - z).clamp_min(0), table, ATT_EXP_BITS), 0)
        vg = v_cache[kpos].to(torch.float64)  # (n, Wn, H, Dh)
        num = torch.einsum("nhj,njhd->nhd", e.to(torch.float64), vg).to(torch.int64)
        den = e.sum(-1, keepdim=True)  # (n, H, 1)
        safe = den.clamp_min(1)
        o = torch.div(2 * num + safe, 2 * safe, rounding_mode="floor")
        out[lo:hi] = torch.where(den > 0, o, 0)
    return out


def logits_to_cdfs(logits: torch.Tensor, precision: int = 24) -> torch.Tensor:
    """Integer logits (N, K) in units of ``2^-LOG_BITS`` bits -> integer CDFs (N, K+1) int32.

    ``e_i = exp2_neg(max - l_i)`` with ``e <= 2^30`` (the maximum gets exactly ``2^30``),
    ``f_i = 1 + floor(e_i * (2^P - K) / sum(e))`` (``e_i * 2^P < 2^54``), and the remainder
    ``2^P - sum(f)`` (``>= 0``) is added to the first maximal entry; so every ``f_i >= 1`` and
    ``sum(f) = 2^P``. Returns ``[0, cumsum(f)]`` as int32, the coder's CDF layout.
    """
    n, k = logits.shape
    total = 1 << precision
    if k > total:
        raise ValueError(f"logits_to_cdfs: K = {k} > 2^precision = {total}")
    table = exp2_table(PROB_EXP_BITS, logits.device)
    top = logits.max(dim=-1, keepdim=True).values
    e = exp2_neg(top - logits, table, PROB_EXP_BITS)
    f = 1 + torch.div(e * (total - k), e.sum(-1, keepdim=True), rounding_mode="floor")
    rest = total - f.sum(-1)
    first = logits.argmax(dim=-1)
    f[torch.arange(n, device=f.device), first] += rest
    cdf = torch.zeros(n, k + 1, dtype=torch.int64, device=f.device)
    cdf[:, 1:] = f.cumsum(-1)
    return cdf.to(torch.int32)


# ---- the integer model ------------------------------------------------------------------------


@dataclasses.dataclass
class IntLinear:
    """``y = clamp(round_shift((a @ w.T + b) * mult, shift), lo, hi)``.

    ``w``: (Dout, Din) int8; ``b``, ``mult``, ``shift``: (Dout,) int64; ``lo``/``hi``: the output
    range (``±127`` for int8 outputs, ``±2^40`` for residual or logit outputs, which the caller
    clamps after adding). ``|a @ w.T| < 2^24``, ``|b| <= 2^30``, ``mult < 2^30``: the product
    stays below ``2^61``.
    """

    w: torch.Tensor
    b: torch.Tensor
    mult: torch.Tensor
    shift: torch.Tensor
    lo: int = -127
    hi: int = 127

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        acc = int_matmul(a, self.w) + self.b
        return round_shift(acc * self.mult, self.shift).clamp(self.lo, self.hi)

    def rows(self, start: int, stop: int) -> IntLinear:
        """The output channels ``start:stop`` as a linear of their own."""
        sl = slice(start, stop)
        return IntLinear(self.w[sl], self.b[sl], self.mult[sl], self.shift[sl], self.lo, self.hi)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.w": self.w,
            f"{prefix}.b": self.b,
            f"{prefix}.mult": self.mult,
            f"{prefix}.shift": self.shift,
        }

    @classmethod
    def from_tensors(cls, t: dict, prefix: str, lo: int, hi: int) -> IntLinear:
        lin = cls(t[f"{prefix}.w"], t[f"{prefix}.b"], t[f"{prefix}.mult"], t[f"{prefix}.shift"])
        lin.lo, lin.hi = lo, hi
        lin.validate(prefix)
        return lin

    def validate(self, name: str) -> None:
        w, b, m, s = self.w, self.b, self.mult, self.shift
        dout, din = w.shape
        if w.dtype != torch.int8 or int(w.min()) < -127:
            raise ValueError(f"integer entropy model: {name}.w must be int8 in [-127, 127]")
        if din > MAX_INNER:
            raise ValueError(f"integer entropy model: {name} inner dim {din} > {MAX_INNER}")
        for t, tn in ((b, "b"), (m, "mult"), (s, "shift")):
            if t.dtype != torch.int64 or t.shape != (dout,):
                raise ValueError(f"integer entropy model: {name}.{tn} must be int64 ({dout},)")
        if int(b.abs().max()) > (1 << 30):
            raise ValueError(f"integer entropy model: {name}.b out of range (|b| <= 2^30)")
        if int(m.min()) < 0 or int(m.max()) >= (1 << MULT_BITS):
            raise ValueError(f"integer entropy model: {name}.mult out of range [0, 2^30)")
        if int(s.min()) < 1 or int(s.max()) > 62:
            raise ValueError(f"integer entropy model: {name}.shift out of range [1, 62]")


_RES = (-(1 << 40), 1 << 40)  # residual/logit linear outputs: clamped by the caller


def _res_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x + y).clamp(-RES_LIMIT, RES_LIMIT)


@dataclasses.dataclass
class _IntBlock:
    norm1: int
    qkv: IntLinear
    score_mult: int
    score_shift: int
    bias: torch.Tensor  # (H, 2R+1, 2R+1) int64
    proj: IntLinear
    norm2: int
    fc1: IntLinear
    act: torch.Tensor  # (255,) int64 table, index = input + 127
    fc2: IntLinear


@dataclasses.dataclass
class _IntMLP:
    norm: int
    fc1: IntLinear
    act: torch.Tensor
    fc2: IntLinear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = self.act[self.fc1(rms_norm_int(x, self.norm)) + 127]
        return _res_add(x, self.fc2(g))


class IntMIM:
    """The integer entropy model: built from the tensors of
    :meth:`pqmim_kernels.models.mim.MIMEntropyModel.export_int` (every field validated).

    Shapes: M sub-spaces, K codes, width W, H heads of Dh = W / H, radius R.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        t = {k: v.cpu() for k, v in tensors.items()}
        self.tensors = t
        self.meta = dict(meta)
        m, k, width = int(meta["num_subspaces"]), int(meta["codebook_size"]), int(meta["width"])
        self.num_subspaces, self.codebook_size, self.width = m, k, width
        self.heads, self.radius = int(meta["heads"]), int(meta["radius"])
        self.depth, self.head_depth = int(meta["depth"]), int(meta["head_depth"])
        if not 0 <= self.radius <= MAX_RADIUS:
            raise ValueError(f"integer entropy model: radius {self.radius} not in [0, 8]")
        if width % self.heads:
            raise ValueError("integer entropy model: width is not a multiple of heads")
        self.code_embedding = self._table(t, "code_embedding", (m * k, width))
        self.mask_embedding = self._table(t, "mask_embedding", (width,))
        self.blocks = []
        side = 2 * self.radius + 1
        for i in range(self.depth):
            p = f"blocks.{i}"
            sm, ss = int(t[f"{p}.score_mult"]), int(t[f"{p}.score_shift"])
            if not (1 <= sm < (1 << 11) and 0 <= ss <= 40):
                raise ValueError(f"integer entropy model: {p} score multiplier out of range")
            bias = self._table(t, f"{p}.bias", (self.heads, side, side), limit=(1 << 24) - 1)
            self.blocks.append(
                _IntBlock(
                    norm1=self._exponent(t, f"{p}.norm1"),
                    qkv=IntLinear.from_tensors(t, f"{p}.qkv", -127, 127),
                    score_mult=sm,
                    score_shift=ss,
                    bias=bias,
                    proj=IntLinear.from_tensors(t, f"{p}.proj", *_RES),
                    norm2=self._exponent(t, f"{p}.norm2"),
                    fc1=IntLinear.from_tensors(t, f"{p}.fc1", -127, 127),
                    act=self._act(t, f"{p}.act"),
                    fc2=IntLinear.from_tensors(t, f"{p}.fc2", *_RES),
                )
            )
        self.cond_embedding = self._table(t, "cond_embedding", (max(m - 1, 1) * k, width))
        self.step_embedding = self._table(t, "step_embedding", (m, width))
        self.head_blocks = [
            _IntMLP(
                self._exponent(t, f"head.{i}.norm"),
                IntLinear.from_tensors(t, f"head.{i}.fc1", -127, 127),
                self._act(t, f"head.{i}.act"),
                IntLinear.from_tensors(t, f"head.{i}.fc2", *_RES),
            )
            for i in range(self.head_depth)
        ]
        self.out_norm = self._exponent(t, "out.norm")
        self.out = IntLinear.from_tensors(t, "out", -(1 << 30), 1 << 30)
        if self.out.w.shape != (m * k, width):
            raise ValueError("integer entropy model: out.w must be (M*K, W)")
        self._offsets = torch.arange(m) * k
        self.device = torch.device("cpu")

    # -- loading helpers --

    @staticmethod
    def _table(t, name, shape, limit=1 << 20) -> torch.Tensor:
        v = t[name]
        if v.dtype != torch.int64 or tuple(v.shape) != tuple(shape):
            raise ValueError(f"integer entropy model: {name} must be int64 {tuple(shape)}")
        if v.numel() and int(v.abs().max()) > limit:
            raise ValueError(f"integer entropy model: {name} out of range (|x| <= {limit})")
        return v

    @staticmethod
    def _exponent(t, name) -> int:
        e = int(t[name])
        if not 0 <= e <= 7:
            raise ValueError(f"integer entropy model: {name} exponent {e} not in [0, 7]")
        return e

    @staticmethod
    def _act(t, name) -> torch.Tensor:
        a = t[name]
        if a.dtype != torch.int64 or a.shape != (255,) or int(a.abs().max()) > 127:
            raise ValueError(f"integer entropy model: {name} must be int64 (255,) in [-127, 127]")
        return a

    def to(self, device) -> IntMIM:
        """Move every tensor to ``device`` (the integers are the same everywhere)."""
        dev = torch.device(device)

        def mv(obj):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if isinstance(v, torch.Tensor):
                    setattr(obj, f.name, v.to(dev))
                elif dataclasses.is_dataclass(v):
                    mv(v)

        for name in ("code_embedding", "mask_embedding", "cond_embedding", "step_embedding"):
            setattr(self, name, getattr(self, name).to(dev))
        for b in [*self.blocks, *self.head_blocks]:
            mv(b)
        mv(self.out)
        self._offsets = self._offsets.to(dev)
        self.device = dev
        return self

    # -- the two streams --

    def new_cache(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty known-stream caches: keys and values (depth, h*w, H, Dh) int8."""
        shape = (self.depth, num_positions, self.heads, self.width // self.heads)
        return (
            torch.zeros(shape, dtype=torch.int8, device=self.device),
            torch.zeros(shape, dtype=torch.int8, device=self.device),
        )

    def _attend(self, blk, layer, q, pos, limit, cache, key_stage, grid, attention):
        heads, dh = self.heads, self.width // self.heads
        return attention(
            q.view(-1, heads, dh),
            pos,
            limit,
            cache[0][layer],
            cache[1][layer],
            key_stage,
            grid,
            self.radius,
            blk.score_mult,
            blk.score_shift,
            blk.bias,
        ).reshape(-1, self.width)

    def known_stream(self, codes, pos, stage, cache, key_stage, grid, attention=None) -> None:
        """Run the known stream on tokens whose codes are known and fill ``cache`` at ``pos``.

        ``codes``: (N, M) int64; ``pos``: (N,) int64 raster positions; ``stage``: (N,) their
        stages (keys visible: stage <= own). ``key_stage``: (h*w,) stage of every position, where
        positions whose known-stream keys are not in the cache yet must hold a stage greater than
        every stage in ``stage`` (the tokens of ``pos`` themselves are written before they are
        read). ``attention``: the kernel (default :func:`window_attention_int`).
        """
        attention = attention or window_attention_int
        w = self.width
        x = self.code_embedding[codes + self._offsets].sum(1).clamp(-RES_LIMIT, RES_LIMIT)
        limit = stage + 1
        for i, blk in enumerate(self.blocks):
            qkv = blk.qkv(rms_norm_int(x, blk.norm1))
            heads, dh = self.heads, w // self.heads
            cache[0][i][pos] = qkv[:, w : 2 * w].reshape(-1, heads, dh).to(torch.int8)
            cache[1][i][pos] = qkv[:, 2 * w :].reshape(-1, heads, dh).to(torch.int8)
            o = self._attend(blk, i, qkv[:, :w], pos, limit, cache, key_stage, grid, attention)
            x = self._block_rest(blk, x, o)

    def query_stream(self, pos, stage, cache, key_stage, grid, attention=None) -> torch.Tensor:
        """Query-stream outputs (N, W) int64 for tokens at ``pos`` (keys visible: stage < own)."""
        attention = attention or window_attention_int
        w = self.width
        x = self.mask_embedding.expand(pos.shape[0], w)
        for i, blk in enumerate(self.blocks):
            q = blk.qkv.rows(0, w)(rms_norm_int(x, blk.norm1))
            o = self._attend(blk, i, q, pos, stage, cache, key_stage, grid, attention)
            x = self._block_rest(blk, x, o)
        return x

    @staticmethod
    def _block_rest(blk: _IntBlock, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        x = _res_add(x, blk.proj(o))
        g = blk.act[blk.fc1(rms_norm_int(x, blk.norm2)) + 127]
        return _res_add(x, blk.fc2(g))

    # -- the sub-code head --

    def head_logits(self, xq: torch.Tensor, prefix: torch.Tensor, m: int) -> torch.Tensor:
        """Integer logits (N, K) of sub-code ``m`` given the query outputs ``xq`` (N, W) and the
        sub-codes ``prefix`` (N, >= m) int64 of sub-spaces ``0..m-1`` of the same tokens."""
        k = self.codebook_size
        z = xq + self.step_embedding[m]
        if m:
            offs = torch.arange(m, device=xq.device) * k
            z = z + self.cond_embedding[prefix[:, :m] + offs].sum(1)
        z = z.clamp(-RES_LIMIT, RES_LIMIT)
        for blk in self.head_blocks:
            z = blk(z)
        return self.out.rows(m * k, (m + 1) * k)(rms_norm_int(z, self.out_norm))

    def all_head_logits(self, xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits (N, M, K) of every sub-code given all codes (N, M) (what the encoder needs);
        row ``m`` equals :meth:`head_logits` ``(xq, codes, m)``."""
        return torch.stack(
            [self.head_logits(xq, codes, m) for m in range(self.num_subspaces)], dim=1
        )


class IntSession:
    """Per-image coding state of the spec: the known-stream caches and the stage of every
    position. The codec drives it stage by stage (:meth:`PQMIM._code`); the C++ engine's
    session (:mod:`pqmim_kernels.coding.int_kernels`) has the same methods and results.

    ``model``: an :class:`IntMIM` (on the device to compute on); ``grid``: ``(h, w)``;
    ``key_stage``: (h*w,) int64 stage of every raster position.
    """

    def __init__(self, model: IntMIM, grid: tuple[int, int], key_stage: torch.Tensor) -> None:
        self.model, self.grid = model, grid
        self.key_stage = key_stage.to(model.device).clone()
        self.cache = model.new_cache(grid[0] * grid[1])

    def query(self, pos: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """Query-stream outputs (n, W) for tokens at ``pos`` (n,) of stages ``stage`` (n,)."""
        return self.model.query_stream(pos, stage, self.cache, self.key_stage, self.grid)

    def set_key_stage(self, pos: torch.Tensor, stage: torch.Tensor) -> None:
        """Give the positions ``pos`` (n,) the stages ``stage`` (n,) (the sampled fill of
        unsent stages: unfilled positions get a stage above every query's, filled ones the
        stage of the iteration that fixed them)."""
        self.key_stage[pos.to(self.key_stage.device)] = stage.to(self.key_stage)

    def known(self, codes: torch.Tensor, pos: torch.Tensor, stage: torch.Tensor) -> None:
        """Known stream of tokens with ``codes`` (n, M) at ``pos``: fills the caches."""
        self.model.known_stream(codes, pos, stage, self.cache, self.key_stage, self.grid)

    def head_logits(self, xq: torch.Tensor, prefix: torch.Tensor, m: int) -> torch.Tensor:
        """Integer logits (n, K) of sub-code ``m`` (see :meth:`IntMIM.head_logits`)."""
        return self.model.head_logits(xq, prefix, m)

    @staticmethod
    def cdfs(logits: torch.Tensor):
        """CDFs (n, K+1) int32 numpy array of integer logits (:func:`logits_to_cdfs`)."""
        return logits_to_cdfs(logits.to(torch.int64)).cpu().numpy()
