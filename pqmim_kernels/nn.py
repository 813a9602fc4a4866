"""Drop-in ``torch.nn`` modules for trainers: the product quantizer and the attention block."""

from __future__ import annotations

# ---- product quantization (issue: pq_assign / ProductQuantizer) ----

# ---- masked attention blocks (issue: masked flash attention) ----
