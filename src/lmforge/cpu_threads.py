"""Setting torch's CPU thread count: `set_cpu_threads`, which every part of lmforge that sets it calls.

torch 2.13's MKL build computes a process's first vector-math call (MKL VML: the kernels behind torch's float
exp, log, tanh, ... on CPU) wrongly now and then when that call comes after `torch.set_num_threads` and after a
CPU `scaled_dot_product_attention`: one thread's share of the elements comes out at low accuracy (exp off by up
to ~1,250 units in the last place, 1.5e-4 relative), in one process in ten or twenty on a busy machine. Every
later call is exact, and a first call made before the attention is too. So the first call is made here, on a
throwaway tensor, right after the count is set: a training run's first loss is then the same in every process.
"""

from __future__ import annotations

import torch

# elements per thread in the throwaway call: torch hands element-wise kernels 2048 at a time, so each thread gets some
_ELEMENTS_PER_THREAD = 4096


def set_cpu_threads(n: int) -> None:
    """torch.set_num_threads(n), then one vector-math call across the n threads (see the module's docstring)."""
    torch.set_num_threads(n)
    torch.linspace(1.0, 2.0, _ELEMENTS_PER_THREAD * n).log_()
