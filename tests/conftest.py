"""Test configuration: Triton kernels run through the interpreter on CPU machines.

``TRITON_INTERPRET`` must be set before triton is first imported; set ``FASTDPO_GPU_TESTS=1`` on a CUDA machine to
compile the kernels for the GPU instead.
"""
import os

if os.environ.get("FASTDPO_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

# Shared offline fixtures (tests/tiny.py) are imported as `import tiny` from every test file: --import-mode=importlib
# does not put the tests directory on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))
