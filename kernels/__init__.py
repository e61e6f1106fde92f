"""Triton kernels for CUDA tensors (installed as `aniso_fast.kernels`)."""
