"""Pretraining: token shards -> the objective's batches -> the shared trainer.

clm (decoder, GPT): packed next-token batches; mlm (encoder, BERT): 15% of tokens masked 80/10/10;
span (encoder-decoder, T5): spans replaced by sentinels, the decoder writes them out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import ValidationError

import lmforge
from lmforge.config import PretrainConfig
from lmforge.config_loading import validation_summary
from lmforge.data.batches import PackedBatches
from lmforge.data.mixture import MixedBatches, load_sources
from lmforge.data.shards import ShardIndex, load_shards
from lmforge.errors import ConfigError, DataError
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.tokenizer import SENTINELS, Tokenizer
from lmforge.train.console import report
from lmforge.train.objectives import causal_lm_loss, masked_lm_loss, seq2seq_loss
from lmforge.train.trainer import TrainResult, train

Batch = dict[str, torch.Tensor]
Sources = tuple[list[str], list[ShardIndex], list[float]]  # names, shard indexes, weights (lmforge.data.mixture)
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
    return _first(val, tcfg.eval_batches)


def _first(batches: BatchSource, n: int) -> Callable[[], Iterator[Batch]]:
    n = min(n, batches.num_batches_per_epoch)
    return lambda: (batches.batch(i) for i in range(n))


def _mixture_batches(config: PretrainConfig, sources: Sources, seq_len: int) -> tuple[BatchSource, Callable | None]:
    """Training and validation batches of the data.sources mixture (validation: the sources' held-out splits, mixed
    with the same weights)."""
    tcfg = config.train
    names, indexes, weights = sources
    train_batches = MixedBatches([ix.tokens("train") for ix in indexes], weights, seq_len, tcfg.batch_size,
                                 tcfg.seed, names)
    if tcfg.progress and os.environ.get("RANK", "0") == "0":  # under torchrun, each rank reads its own batches
        world = int(os.environ.get("WORLD_SIZE", "1"))
        report(train_batches.describe(tcfg.max_steps * tcfg.grad_accum * tcfg.batch_size * world))
    val = [(name, ix.tokens("val"), w) for name, ix, w in zip(names, indexes, weights, strict=True)
           if len(ix.tokens("val")) > seq_len]
    if not val:
        return train_batches, None
    windows = sum(len(tokens) // (seq_len + 1) for _, tokens, _ in val)
    mixed = MixedBatches([t for _, t, _ in val], [w for *_, w in val], seq_len, min(tcfg.batch_size, windows),
                         tcfg.seed, [n for n, *_ in val], shuffle=False)
    return train_batches, _first(mixed, tcfg.eval_batches)


def _initial_model(config: PretrainConfig, tokenizer: Tokenizer) -> tuple[torch.nn.Module, PretrainConfig]:
    """A new model of config.model, or config.init_from's weights (the config then records their architecture)."""
    if not config.init_from:
        torch.manual_seed(config.train.seed)
        return build_model(config.model), config
    model, source_tokenizer = lmforge.load(config.init_from)
    if source_tokenizer is not None and source_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ConfigError(f"--init-from {config.init_from}: its tokenizer differs from the data's; prepare the data "
                          f"with it (lmforge data prepare --tokenizer {config.init_from} ...)")
    try:
        config = PretrainConfig.model_validate({**config.model_dump(), "model": model.cfg.model_dump()})
    except ValidationError as err:
        raise ConfigError(f"--init-from {config.init_from}: {validation_summary(err, PretrainConfig)}") from None
    torch.manual_seed(config.train.seed)  # the run's dropout noise, as from scratch
    return model.train(), config


def pretrain(config: PretrainConfig, resume: bool = False, accept_config_change: bool = False) -> TrainResult:
    """Pretrain on the shards in config.data.dir (or the config.data.sources mixture) with config.objective, from
    scratch or from config.init_from's weights; checkpoints go to config.train.out_dir."""
    tcfg = config.train
    if config.data.sources and config.objective != "clm":
        raise ConfigError(f"data.sources mixes packed causal-LM rows, so it needs objective clm (got "
                          f"'{config.objective}'); use data.dir for {config.objective}")
    sources = load_sources(config.data.sources) if config.data.sources else None
    shards = None if sources else load_shards(config.data.dir)
    data_dir = sources[1][0].directory if sources else Path(config.data.dir)
    tokenizer = Tokenizer.from_file(data_dir)
    model, config = _initial_model(config, tokenizer)
    mcfg = config.model
    if mcfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"({data_dir}/tokenizer.json); set --model.vocab_size={tokenizer.vocab_size} or more"
        )
    seq_len = tcfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if sources:
        train_batches, val_batches = _mixture_batches(config, sources, seq_len)
    else:
        train_batches = make_batches(config.objective, shards.tokens("train"), seq_len, tcfg.batch_size, tcfg.seed,
                                     tokenizer)
        val_batches = validation_batches(config, shards.tokens("val"), seq_len, tokenizer)
    return train(model, tcfg, train_batches.batch, LOSSES[config.objective],
                 run_config=CheckpointManifest.of_run("pretrain", config, model=mcfg), tokenizer=tokenizer,
                 val_batches=val_batches, resume=resume, accept_config_change=accept_config_change)
