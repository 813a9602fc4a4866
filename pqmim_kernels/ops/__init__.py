"""Triton kernels, one file per op (kernels -> launcher -> autograd.Function).

Modules here import Triton at import time; import them only through
:mod:`pqmim_kernels.functional`, which checks that Triton is available first.
"""
