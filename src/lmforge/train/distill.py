"""Knowledge distillation (Hinton et al. 2015): a student decoder learns a frozen teacher's softened distribution.

The teacher is held by the loss function's closure and runs under inference mode; only the student goes to the
trainer (so only the student is optimised, checkpointed and, under DDP, wrapped). Both must read the same
tokenizer; their vocab sizes may differ by padding rows, so logits are cut to the tokenizer's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.checkpoint import resolve_checkpoint
from lmforge.config import DataConfig, ModelConfig, PeftConfig, StrictModel, TrainConfig
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer, require_same_vocab
from lmforge.train.console import report
from lmforge.train.loss import LossResult
from lmforge.train.objectives import IGNORE_INDEX, token_cross_entropy
from lmforge.train.stage_setup import load_decoder
from lmforge.train.trainer import LossFn, TrainResult, train

Batch = dict[str, Tensor]


class DistillConfig(StrictModel):
    """Distil config.teacher into a student (an existing checkpoint or a fresh, smaller decoder) on token shards."""

    teacher: str = ""  # a decoder: lmforge run/checkpoint dir or Hugging Face dir
    student: str = ""  # start from this checkpoint, or ...
    student_model: ModelConfig | None = None  # ... build this (smaller) decoder from scratch
    data: DataConfig = DataConfig()  # shards prepared with the teacher's tokenizer
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the soft (teacher) term; 1 - alpha on the hard labels
    train_tokens: int | None = Field(None, ge=1)  # train on the first N tokens of the train split only (a small
    # labelled set: Hinton et al. 2015 show soft targets matter most when labels are scarce)
    peft: PeftConfig | None = None  # parameter-efficient training of a student checkpoint
    train: TrainConfig = TrainConfig(out_dir="runs/distill", max_steps=1000, lr=1e-3, min_lr=1e-4)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float,
                      alpha: float) -> LossResult:
    """alpha * tau^2 * soft + (1 - alpha) * hard (Hinton et al. 2015, sec. 2), summed over positions.

    soft = -sum_v p_T(v) log p_S(v) with p = softmax(z / tau), the cross-entropy with the soft targets (it is
    KL(p_T || p_S) plus the teacher's entropy, a constant: same gradient); hard = cross-entropy with the labels
    at tau = 1. Both are over positions whose label is not IGNORE_INDEX. The soft term's gradients scale
    as 1/tau^2, hence the tau^2 that keeps its weight independent of tau. Computed in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; cut both to the tokenizer's vocabulary")
    keep = labels != IGNORE_INDEX
    log_p_student = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits[keep].float() / temperature, dim=-1)
    soft = -(p_teacher * log_p_student).sum()
    hard = token_cross_entropy(student_logits, labels)
    return LossResult(alpha * temperature**2 * soft + (1 - alpha) * hard.total, hard.count)


def distill_loss_fn(teacher: nn.Module, temperature: float, alpha: float, vocab_size: int) -> LossFn:
    """The trainer's loss on packed LM batches (`input_ids`, `labels`); the frozen teacher follows the batch's
    device (the trainer moves only the student). In eval mode (validation) it is the student's plain
    cross-entropy, so validation losses compare across temperatures and alphas, and with no teacher at all."""
    teacher.eval().requires_grad_(False)

    def loss(model: nn.Module, batch: Batch) -> LossResult:
        ids = batch["input_ids"]
        if not model.training or alpha == 0:
            return token_cross_entropy(model(ids)[..., :vocab_size], batch["labels"])
        if next(teacher.parameters()).device != ids.device:
            teacher.to(ids.device)
        with torch.inference_mode():
            teacher_logits = teacher(ids)[..., :vocab_size]
        return distillation_loss(model(ids)[..., :vocab_size], teacher_logits, batch["labels"], temperature, alpha)

    return loss


def tokenizer_path(path: str | Path) -> Path:
    return resolve_checkpoint(path) / TOKENIZER_FILE


def _val_batches(tokens: np.ndarray, seq_len: int, cfg: TrainConfig) -> Callable[[], Iterator[Batch]] | None:
    """The first train.eval_batches batches of the validation split, in order (None if it is too small)."""
    windows = len(tokens) // (seq_len + 1)
    if windows == 0:
        return None
    val = PackedBatches(tokens, seq_len, min(cfg.batch_size, windows), cfg.seed, shuffle=False)
    n = min(cfg.eval_batches, val.num_batches_per_epoch)
    return lambda: (val.batch(i) for i in range(n))


def distill(config: DistillConfig, resume: bool = False, accept_config_change: bool = False) -> TrainResult:
    """Distil config.teacher into the student on the shards in config.data.dir; checkpoints the student."""
    if not config.teacher:
        raise ConfigError("distillation needs a teacher (--teacher DIR)")
    if bool(config.student) == (config.student_model is not None):
        raise ConfigError("distillation needs exactly one student: a checkpoint (--student DIR) or a fresh "
                          "architecture (--student_model.n_layer=... and the other model keys)")
    teacher, tokenizer = load_decoder(config.teacher, "distillation")
    data_tokenizer = Tokenizer.from_file(config.data.dir)
    require_same_vocab(tokenizer, tokenizer_path(config.teacher), data_tokenizer,
                       Path(config.data.dir) / TOKENIZER_FILE, "distillation")
    tcfg = config.train
    if config.student:
        student, student_tokenizer = load_decoder(config.student, "distillation")
        require_same_vocab(tokenizer, tokenizer_path(config.teacher), student_tokenizer,
                           tokenizer_path(config.student), "distillation")
    else:
        torch.manual_seed(tcfg.seed)
        student = DecoderLM(config.student_model)
    if config.peft is not None:
        report(apply_peft(student, config.peft))
    vocab = tokenizer.vocab_size
    seq_len = tcfg.seq_len or student.cfg.max_seq_len
    for name, model in (("teacher", teacher), ("student", student)):
        if model.cfg.vocab_size < vocab:
            raise ConfigError(f"the {name}'s vocab_size={model.cfg.vocab_size} is smaller than the tokenizer's "
                              f"{vocab} tokens")
        if model.cfg.position == "learned" and seq_len > model.cfg.max_seq_len:
            raise ConfigError(f"train.seq_len={seq_len} exceeds the {name}'s max_seq_len={model.cfg.max_seq_len}")
    shards = load_shards(config.data.dir)
    train_tokens = shards.tokens("train")
    if config.train_tokens is not None and config.train_tokens > len(train_tokens):
        raise ConfigError(f"train_tokens={config.train_tokens} exceeds the {len(train_tokens)} tokens of the train "
                          f"split in {config.data.dir}; give at most {len(train_tokens)}, or leave it unset for all")
    batches = PackedBatches(train_tokens[:config.train_tokens], seq_len, tcfg.batch_size, tcfg.seed)
    return train(student, tcfg, batches.batch, distill_loss_fn(teacher, config.temperature, config.alpha, vocab),
                 run_config=CheckpointManifest.of_run("distill", config, model=student.cfg, peft=config.peft),
                 tokenizer=tokenizer, val_batches=_val_batches(shards.tokens("val"), seq_len, tcfg), resume=resume,
                 accept_config_change=accept_config_change)
