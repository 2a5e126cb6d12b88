"""Reward modelling (Ouyang et al. 2022, sec. 3.5): a decoder with a scalar head, trained on preference pairs.

A pair batch stacks the chosen rows on top of the rejected rows in one right-padded `input_ids` [2B, T], so a
single forward scores both halves and the trainer counts every token. The pieces shared with DPO live here:
`stack_pairs`, `pair_rows`, `load_decoder`, `reward_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import lmforge
from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.model.heads import last_token_index
from lmforge.peft.config import apply_peft_to_task_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.console import report
from lmforge.train.loss import LossResult
from lmforge.train.trainer import TrainResult, train

Batch = dict[str, Tensor]


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


class RewardModel(nn.Module):
    """r(x, y): a linear `score` on the final hidden state of each row's last real token (right padding;
    causal attention means that token has read the whole prompt and response)."""

    def __init__(self, backbone: DecoderLM):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.d_model, 1, bias=False)  # a bias cancels in r_c - r_r: never trained
        nn.init.normal_(self.score.weight, 0.0, backbone.cfg.init_std)
        if backbone.lm_head.weight is not backbone.tok_emb.weight:  # an untied LM head is unused: freeze it,
            backbone.lm_head.requires_grad_(False)  # so DDP does not wait for its gradient

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards [B]."""
        hidden = self.backbone.hidden(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]
        return self.score(last).squeeze(-1)


def build_reward_model(backbone: nn.Module) -> RewardModel:
    """The reward model on `backbone` (what `build_task_model("reward", backbone)` returns)."""
    if not isinstance(backbone, DecoderLM):
        raise ConfigError(f"a reward model needs a decoder backbone, got {type(backbone).__name__}")
    return RewardModel(backbone)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """-log sigma(r_c - r_r), averaged over pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """A pair batch's log metrics from its chosen and rejected rewards [B]: their means, the mean margin and how
    often the chosen response wins."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean()}


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


# -- preference data, shared with DPO ---------------------------------------------------------------


def stack_pairs(batch: Batch, pad_id: int) -> Batch:
    """`collate_preferences` output -> `input_ids`, `attention_mask`, `response_mask` [2B, T]: the chosen rows
    then the rejected rows, right-padded to one width."""
    width = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])

    def both(key: str, fill: int) -> Tensor:
        halves = [batch[f"{side}_{key}"] for side in ("chosen", "rejected")]
        return torch.cat([F.pad(h.long(), (0, width - h.shape[1]), value=fill) for h in halves])

    return {"input_ids": both("ids", pad_id), "attention_mask": both("attention", 0),
            "response_mask": both("mask", 0).bool()}


def pair_rows(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example ids of batch `index` in an endless stream of seeded per-epoch permutations of n examples: a pure
    function of (seed, index), as the trainer's resume needs (the same stream as `finetune.shuffled_batches`)."""
    batch_size = min(batch_size, n)
    rows, epoch, order = [], -1, np.empty(0)
    for k in range(index * batch_size, (index + 1) * batch_size):
        if k // n != epoch:
            epoch = k // n
            order = np.random.default_rng([seed, epoch]).permutation(n)
        rows.append(int(order[k % n]))
    return rows


def pair_batch(examples: list[Any], rows: list[int], pad_id: int) -> Batch:
    from lmforge.data.sft import collate_preferences

    return stack_pairs(collate_preferences([examples[i] for i in rows], pad_id), pad_id)


def read_pairs(path: str, tokenizer: Tokenizer, template: Any, max_len: int, skip_bad_lines: bool) -> list[Any]:
    """Tokenized preference pairs from a JSONL file, laid out by the chat template (`read_preferences`)."""
    from lmforge.data.sft import read_preferences

    return read_preferences(path, tokenizer, template, max_len, skip_bad_lines=skip_bad_lines).examples


def pair_reader(config: Any, tokenizer: Tokenizer) -> Callable[[str], list[Any]]:
    """path -> pairs, with a RewardConfig or DPOConfig's template (`hf`: config.base's), max_len, skip_bad_lines."""
    from lmforge.data.chat import get_chat_template

    template = get_chat_template(config.template, tokenizer, config.base)
    return partial(read_pairs, tokenizer=tokenizer, template=template, max_len=config.max_len,
                   skip_bad_lines=config.skip_bad_lines)


def load_decoder(path: str, stage: str) -> tuple[DecoderLM, Tokenizer]:
    """A decoder language model and its tokenizer, checked for what `stage` needs."""
    model, tokenizer = lmforge.load(path)
    if not isinstance(model, DecoderLM):
        raise ConfigError(f"{stage} needs a decoder language model; {path} holds a {type(model).__name__}")
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer.json; {stage} needs one")
    return model, tokenizer


def require_fits(model: DecoderLM, path: str, max_len: int, tokens: int) -> None:
    """ConfigError unless sequences of `tokens` tokens (what max_len allows the stage to feed) fit the model."""
    limit = model.cfg.max_seq_len
    if tokens > limit:
        raise ConfigError(f"max_len={max_len} lets this stage feed {tokens} tokens, more than {path}'s "
                          f"max_seq_len={limit}; set --max-len {max_len - tokens + limit} or less")


def ordered_batches(examples: list[Any], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example once, in file order."""
    for i in range(0, len(examples), batch_size):
        yield pair_batch(examples, list(range(i, min(i + batch_size, len(examples)))), pad_id)


def first_batches(batches: list[Batch], n: int) -> Callable[[], list[Batch]]:
    """The trainer's validation callable: the first n batches."""
    return lambda: batches[:n]


def pad_id_of(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


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

    def batch_at(index: int) -> Batch:
        return pair_batch(examples, pair_rows(len(examples), tcfg.batch_size, tcfg.seed, index), pad_id)

    eval_batches = list(ordered_batches(eval_examples, tcfg.batch_size, pad_id)) if eval_examples else None
    val = first_batches(eval_batches, tcfg.eval_batches) if eval_batches else None
    run_config = CheckpointManifest.of_run("reward", config, model=backbone.cfg, task="reward", peft=config.peft)
    final_eval = (lambda m: {"pairwise_accuracy": pairwise_accuracy(m, eval_batches)}) if eval_batches else None
    result = train(model, tcfg, batch_at, reward_pair_loss, run_config=run_config, tokenizer=tokenizer,
                   val_batches=val, resume=resume, accept_config_change=accept_config_change, perplexity=False,
                   final_eval=final_eval)
    return result, result.eval_metrics
