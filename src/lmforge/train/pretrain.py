"""Causal-LM pretraining: token shards -> packed batches -> the shared trainer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.config import PretrainConfig
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainResult, train


def pretrain(config: PretrainConfig, resume: bool = False) -> TrainResult:
    """Pretrain a decoder on the shards in config.data.dir; checkpoints go to config.train.out_dir."""
    mcfg, tcfg = config.model, config.train
    shards = load_shards(config.data.dir)
    tokenizer = Tokenizer.from_file(Path(config.data.dir))
    if mcfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"({config.data.dir}/tokenizer.json); set --model.vocab_size={tokenizer.vocab_size} or more"
        )
    seq_len = tcfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    train_batches = PackedBatches(shards.tokens("train"), seq_len, tcfg.batch_size, seed=tcfg.seed)
    val_tokens = shards.tokens("val")
    val_windows = len(val_tokens) // (seq_len + 1)
    val_batches = None
    if val_windows > 0:
        val = PackedBatches(val_tokens, seq_len, min(tcfg.batch_size, val_windows), seed=tcfg.seed, shuffle=False)
        n_val = min(tcfg.eval_batches, val.num_batches_per_epoch)

        def val_batches() -> Iterator[dict[str, torch.Tensor]]:
            return (val.batch(i) for i in range(n_val))

    torch.manual_seed(tcfg.seed)
    model = DecoderLM(mcfg)
    return train(model, tcfg, train_batches.batch, causal_lm_loss, run_config=config, tokenizer=tokenizer,
                 val_batches=val_batches, resume=resume)
