"""Eager reference implementations: the spec, the CPU fallback and the benchmark baseline."""
