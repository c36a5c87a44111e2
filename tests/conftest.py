"""Test configuration: Triton kernels run through the interpreter on CPU machines.

``TRITON_INTERPRET`` must be set before triton is first imported; set ``FASTDPO_GPU_TESTS=1`` on a CUDA machine to
compile the kernels for the GPU instead.
"""
import os

if os.environ.get("FASTDPO_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
