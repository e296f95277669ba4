import os

import torch

# Triton kernels run on CPU tensors only through triton's interpreter, and triton fixes interpreted vs compiled
# mode when it is first imported (its own @jit library functions are wrapped then). Set the mode here, before
# any test module imports triton or shusheng.ops.dcnv3_triton, so that the triton backend of DCNv3 is tested
# on machines without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
