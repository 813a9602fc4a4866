"""Entropy coding: the rANS coder and probability quantisation (see :mod:`.rans`).

Importing this package loads the compiled extension ``pqmim_kernels._rans``; a missing or
stale build raises ImportError saying how to rebuild (``pip install -e .``).
"""

from pqmim_kernels.coding.rans import (
    DEFAULT_PRECISION,
    MAX_PRECISION,
    RansDecoder,
    RansEncoder,
    decode_probs,
    encode_probs,
    quantize_probs,
)

__all__ = [
    "DEFAULT_PRECISION",
    "MAX_PRECISION",
    "RansDecoder",
    "RansEncoder",
    "decode_probs",
    "encode_probs",
    "quantize_probs",
]
