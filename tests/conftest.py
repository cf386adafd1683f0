"""Test session set-up: without a GPU the Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before the first kernel is defined (the kernels module is imported lazily by
ddpm_fast.ops, after this file runs).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
