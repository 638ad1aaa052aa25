"""Triton kernels of fastflow, installed as ``fastflow.kernels``."""
