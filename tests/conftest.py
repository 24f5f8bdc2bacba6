"""Test-wide settings: one torch thread.

On the 2-core machines of this project, torch's intra-op threads compete with OpenMM's CPU-platform threads
and with each other (measured: index_add 50x slower with 2 contended threads than with 1); one thread gives
stable timings. TF32 stays off everywhere (it breaks equivariance on GPUs).
"""
import torch

torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
