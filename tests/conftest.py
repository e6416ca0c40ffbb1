"""Test-wide setup.

Triton decides when a kernel is decorated whether it runs compiled (GPU) or interpreted, so
TRITON_INTERPRET must be set before anything imports triton or a lowmem kernel module: on a
machine without a CUDA GPU every Triton kernel then runs on CPU tensors through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests choose backends explicitly; an override left in the shell must not change what they test.
os.environ.pop("LOWMEM_BACKEND", None)

import pytest


@pytest.fixture
def device() -> torch.device:
    """The device kernels are tested on: CUDA when present, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
