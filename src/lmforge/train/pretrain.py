"""Pretraining: token shards -> the objective's batches -> the shared trainer.

clm (decoder, GPT): packed next-token batches; mlm (encoder, BERT): 15% of tokens masked 80/10/10;
span (encoder-decoder, T5): spans replaced by sentinels, the decoder writes them out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lmforge.config import PretrainConfig
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError, DataError
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.tokenizer import SENTINELS, Tokenizer
from lmforge.train.objectives import causal_lm_loss, masked_lm_loss, seq2seq_loss
from lmforge.train.trainer import TrainResult, train

Batch = dict[str, torch.Tensor]
LOSSES = {"clm": causal_lm_loss, "mlm": masked_lm_loss, "span": seq2seq_loss}


class BatchSource(Protocol):
    num_batches_per_epoch: int

    def batch(self, index: int) -> Batch: ...


def make_batches(objective: str, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 tokenizer: Tokenizer, shuffle: bool = True) -> BatchSource:
    """The objective's deterministic batch source over a 1-D token stream (batch i = f(seed, i))."""
    if objective == "mlm":
        from lmforge.data.masking import MLMBatches, mlm_token_ids

        return MLMBatches(tokens, seq_len, batch_size, seed, shuffle=shuffle, **mlm_token_ids(tokenizer))
    if objective == "span":
        from lmforge.data.span_corruption import SpanCorruptionBatches

        sentinels = [tokenizer.token_id(s) for s in SENTINELS]
        if None in sentinels or tokenizer.eos_id is None or tokenizer.pad_id is None:
            raise DataError("span corruption needs the tokenizer's <extra_id_N> sentinels, EOS and PAD; train the "
                            "tokenizer with `lmforge tokenizer train`, which reserves them")
        return SpanCorruptionBatches(tokens, seq_len, batch_size, seed, sentinel_ids=sentinels,
                                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, shuffle=shuffle)
    return PackedBatches(tokens, seq_len, batch_size, seed, shuffle=shuffle)


def validation_batches(config: PretrainConfig, tokens: np.ndarray, seq_len: int,
                       tokenizer: Tokenizer) -> Callable[[], Iterator[Batch]] | None:
    """The first train.eval_batches batches of the validation split, in order (None if it is too small)."""
    tcfg = config.train
    windows = len(tokens) // (seq_len + 1)
    if windows == 0:
        return None
    try:
        val = make_batches(config.objective, tokens, seq_len, min(tcfg.batch_size, windows), tcfg.seed, tokenizer,
                           shuffle=False)
    except DataError:
        return None
    n_val = min(tcfg.eval_batches, val.num_batches_per_epoch)
    return lambda: (val.batch(i) for i in range(n_val))


def pretrain(config: PretrainConfig, resume: bool = False, accept_config_change: bool = False) -> TrainResult:
    """Pretrain on the shards in config.data.dir with config.objective; checkpoints go to config.train.out_dir."""
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
    train_batches = make_batches(config.objective, shards.tokens("train"), seq_len, tcfg.batch_size, tcfg.seed,
                                 tokenizer)
    val_batches = validation_batches(config, shards.tokens("val"), seq_len, tokenizer)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg)
    return train(model, tcfg, train_batches.batch, LOSSES[config.objective],
                 run_config=CheckpointManifest.of_run("pretrain", config, model=mcfg), tokenizer=tokenizer,
                 val_batches=val_batches, resume=resume, accept_config_change=accept_config_change)
