"""Triton kernels of fastdpo, installed as ``fastdpo.kernels``.

Only kernels live here (no autograd, no dispatch): see ``fastdpo`` for the ops built on them.
"""
