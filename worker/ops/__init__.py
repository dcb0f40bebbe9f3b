"""Kernels under the model: attention, the KV-cache write and linear layers.

- attention.py: the layout every backend shares, the torch reference (the fallback everywhere
  and the oracle of the tests) and the backend switch.
- triton_attention.py: Triton kernels for attention and the cache write on CUDA.
- cpu_attention.py: decode attention and the cache write in C++ for float32 on the CPU
  (csrc/paged_attention_cpu.cpp, compiled on first use or prebuilt into the images).
- cpu_linear.py: linear layers with their weights packed once for oneDNN, float32 on the CPU.
"""
