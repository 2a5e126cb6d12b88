"""Shared test fixtures, and a coherent stand-in for an AVX2-only CPU.

`ATEN_CPU_CAPABILITY=avx2 make test` runs the suite on other kernels, as another CPU would (exactness tests must
hold there too). The libraries under torch are capped to match, as on such a CPU: left alone, oneDNN still sees this
machine's AMX and makes torch's bf16 attention call packing code that the avx2 kernels lack ("pack_vnni2 is only
supported when avx512 is supported"), and MKL keeps its AVX-512 GEMMs. Both read these variables on first use. The
stand-in also gets its own torch.compile cache, as another machine would: a kernel compiled and cached at this
machine's capability, reloaded under avx2, decodes garbage (torch 2.13).
"""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import pytest
import torch

from lmforge.cpu_threads import set_cpu_threads
from tiny_pretraining import write_word_shards

if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_avx2"))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n K: each worker gets its share of the cores, in-process and in the subprocesses it starts; K workers
    # each on torch's default of every core oversubscribe them, and OpenMP barriers then wait on descheduled threads
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    set_cpu_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores); restored after."""
    before = torch.get_num_threads()
    set_cpu_threads(1)
    yield
    set_cpu_threads(before)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of 600 word documents (5% held out), made once per test module."""
    return write_word_shards(tmp_path_factory.mktemp("data"), n_docs=600, val_fraction=0.05)[1]
