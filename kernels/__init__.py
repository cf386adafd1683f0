"""Triton kernels of ddpm_fast, installed as ``ddpm_fast.kernels`` (one file per op family)."""
