import os

import torch

# Triton decides when a kernel is defined whether it runs compiled or interpreted. Without a GPU
# the Triton kernels are tested through the interpreter, on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
