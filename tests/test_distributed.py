"""Data parallelism under torchrun (gloo on CPU) matches one process training on the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.model.decoder import DecoderLM
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import train
from tiny_pretraining import write_word_shards


@pytest.mark.slow
def test_ddp_two_ranks_equals_single_process_on_the_same_rows(tmp_path: Path) -> None:
    """Two gloo ranks with batch B each == one process with batch 2B made of the same rows
    (allclose at 1e-5: all-reduce changes the summation order, nothing else)."""
    write_word_shards(tmp_path, n_docs=400, val_fraction=0.0)
    tree = {
        "model": {"vocab_size": 400, "max_seq_len": 16, "n_layer": 1, "n_head": 2, "d_model": 16},
        "data": {"dir": str(tmp_path / "shards")},
        "train": {"out_dir": str(tmp_path / "ddp"), "batch_size": 2, "max_steps": 6, "warmup_steps": 2,
                  "save_every": 3, "log_every": 1, "progress": False, "grad_accum": 2},
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lmforge.cli", "pretrain", "--config", str(tmp_path / "ddp.yaml")],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(str(tmp_path / "ddp" / (tmp_path / "ddp" / "latest").read_text().strip() / "model.safetensors"))

    config = load_config(PretrainConfig, tmp_path / "ddp.yaml",
                         {"train.out_dir": str(tmp_path / "single"), "train.batch_size": 4})
    batches = PackedBatches(load_shards(tmp_path / "shards").tokens("train"), 16, 2, seed=config.train.seed)

    def same_rows(i: int) -> dict[str, torch.Tensor]:  # micro-batch i of rank r is batch 2*i + r
        parts = [batches.batch(2 * i + r) for r in range(2)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    torch.manual_seed(config.train.seed)
    model = DecoderLM(config.model)
    train(model, config.train, same_rows, causal_lm_loss, run_config=config)
    single = model.state_dict()
    for name, tensor in ddp.items():
        assert torch.allclose(tensor, single[name], atol=1e-5), name
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [s * 2 * 2 * 2 * 16 for s in range(1, 7)]  # ranks x accum x B x T
