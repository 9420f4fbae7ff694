import os

import pytest
import torch

# Triton decides when a kernel is defined whether it runs compiled or interpreted. Without a GPU
# the Triton kernels are tested through the interpreter, on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: on a small shared CPU, OpenMP threads cost
    far more than they save there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
