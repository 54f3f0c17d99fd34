"""Without a CUDA device the Triton kernels run under Triton's interpreter, on CPU tensors
(DESIGN §6). triton.jit reads TRITON_INTERPRET when fastmargin.kernels is imported, so it
is set here, before any test module imports fastmargin."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
