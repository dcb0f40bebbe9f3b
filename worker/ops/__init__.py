"""Attention and other kernels: Triton on CUDA, torch reference elsewhere."""
