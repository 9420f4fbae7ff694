"""Functional ops. Each file holds one op: its kernels' launchers, fake kernels and autograd."""
from .strip_gate import strip_gate

__all__ = ["strip_gate"]
