"""Triton kernels, each beside its launcher and reference."""
