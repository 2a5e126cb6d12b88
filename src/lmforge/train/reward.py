"""Reward modelling (Ouyang et al. 2022, sec. 3.5): a decoder with a scalar head (`RewardModel`), trained on
preference pairs with the Bradley-Terry loss. A pair batch (`lmforge.data.pairs`) stacks the chosen rows on top of
the rejected rows, so a single forward scores both halves.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.data.pairs import Batch, collate_pairs, ordered_pair_batches, pair_reader
from lmforge.data.sampler import shuffled_batches
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.value_heads import build_reward_model
from lmforge.peft.config import apply_peft_to_task_model
from lmforge.train.console import report
from lmforge.train.loss import LossResult
from lmforge.train.pair_metrics import reward_metrics
from lmforge.train.stage_setup import first_batches, load_decoder, pad_id_of, require_fits
from lmforge.train.trainer import TrainResult, train


class RewardConfig(StrictModel):
    """Reward-model training on preference pairs: JSONL of {prompt, chosen, rejected} (`read_preferences`)."""

    base: str = ""  # a decoder (lmforge run/checkpoint dir or Hugging Face dir), usually the SFT model
    train_file: str = ""
    eval_file: str | None = None  # held-out pairs: pairwise accuracy is reported on them
    template: str = "lmforge"  # chat template name (`get_chat_template`)
    max_len: int = Field(256, ge=2)
    skip_bad_lines: bool = False
    peft: PeftConfig | None = None  # parameter-efficient training of the backbone (the score head always trains)
    train: TrainConfig = TrainConfig(out_dir="runs/reward", max_steps=300, lr=5e-4, min_lr=5e-5, warmup_steps=20,
                                     batch_size=16, eval_every=100, save_every=100)




def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """-log sigma(r_c - r_r), averaged over pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def reward_pair_loss(model: nn.Module, batch: Batch) -> LossResult:
    """Bradley-Terry loss of a stacked pair batch (`input_ids`, `attention_mask`: chosen rows, then rejected),
    summed over its pairs, with the rewards' `reward_metrics`."""
    r_chosen, r_rejected = model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    return LossResult(bradley_terry_loss(r_chosen, r_rejected) * len(r_chosen), len(r_chosen),
                      reward_metrics(r_chosen, r_rejected))


@torch.inference_mode()
def pairwise_accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of pairs whose chosen response gets the higher reward (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in batches:
        r_chosen, r_rejected = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).chunk(2)
        correct += int((r_chosen > r_rejected).sum())
        total += len(r_chosen)
    model.train(was_training)
    return correct / max(total, 1)


def train_reward_model(config: RewardConfig, resume: bool = False,
                       accept_config_change: bool = False) -> tuple[TrainResult, dict[str, float]]:
    """Train a reward model on config.train_file from config.base; (train result, held-out metrics)."""
    if not config.base or not config.train_file:
        raise ConfigError("reward model training needs a base model (--base DIR) and pairs (--train-file FILE)")
    backbone, tokenizer = load_decoder(config.base, "reward model training")
    require_fits(backbone, config.base, config.max_len, config.max_len + 1)  # a pair has up to max_len + 1 tokens
    pad_id = pad_id_of(tokenizer)
    read = pair_reader(config, tokenizer)
    examples = read(config.train_file)
    eval_examples = read(config.eval_file) if config.eval_file else None
    torch.manual_seed(config.train.seed)
    model = build_reward_model(backbone)
    if config.peft is not None:
        report(apply_peft_to_task_model(model, config.peft))
    tcfg = config.train
    batch_at = shuffled_batches(examples, tcfg.batch_size, tcfg.seed, partial(collate_pairs, pad_id=pad_id))
    eval_batches = list(ordered_pair_batches(eval_examples, tcfg.batch_size, pad_id)) if eval_examples else None
    val = first_batches(eval_batches, tcfg.eval_batches) if eval_batches else None
    run_config = CheckpointManifest.of_run("reward", config, model=backbone.cfg, task="reward", peft=config.peft)
    final_eval = (lambda m: {"pairwise_accuracy": pairwise_accuracy(m, eval_batches)}) if eval_batches else None
    result = train(model, tcfg, batch_at, reward_pair_loss, run_config=run_config, tokenizer=tokenizer,
                   val_batches=val, resume=resume, accept_config_change=accept_config_change, perplexity=False,
                   final_eval=final_eval)
    return result, result.eval_metrics
