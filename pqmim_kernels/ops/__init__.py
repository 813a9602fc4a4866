"""Triton kernels, one file per op: kernels, then the host launchers that reshape and launch.

The autograd wiring and the argument checks are not here: :mod:`pqmim_kernels.functional`
registers each op as a torch custom op (with its backward), validates the inputs with the
checks in :mod:`pqmim_kernels.reference`, and chooses the backend. The op modules import
Triton at import time; import them only through :mod:`pqmim_kernels.functional`, which checks
that Triton is available first. :mod:`pqmim_kernels.ops._launch` (no Triton import) holds the
kernel limits, the device limits and the launch-config fitting shared by the ops.
"""
