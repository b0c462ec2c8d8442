"""Triton kernels, installed as fastssl.kernels: @triton.jit code and launch helpers only."""
