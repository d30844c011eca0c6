"""GSPN line-scan propagation (DESIGN.md §3): the public op, its PyTorch reference, its CUDA kernels."""

from .ops import available_backends, gspn_mix, gspn_scan

__all__ = ["available_backends", "gspn_mix", "gspn_scan"]
