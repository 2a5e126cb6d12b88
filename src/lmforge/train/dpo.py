"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference pairs.

The reference policy is the starting policy, frozen. Its log-probabilities never change, so they are computed
once, before training, by a frozen copy run over the whole dataset under inference mode (the copy is freed
before the first step, and on `resume` they are recomputed from config.base, the same numbers). Each training
batch carries them as `ref_chosen_logps` / `ref_rejected_logps`; the loss needs only the policy's forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.data.pairs import Batch, collate_pairs, ordered_pair_batches, pair_reader
from lmforge.data.sampler import EpochSampler
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.peft.config import apply_peft
from lmforge.train.console import report
from lmforge.train.distributed import init_distributed
from lmforge.train.logprobs import frozen_copy, response_logprobs, sequence_logprob
from lmforge.train.loss import LossResult
from lmforge.train.pair_metrics import reward_metrics
from lmforge.train.stage_setup import first_batches, load_decoder, pad_id_of, require_fits
from lmforge.train.trainer import TrainResult, autocast, resolve_device, train

Kind = Literal["sigmoid", "ipo"]


class DPOConfig(StrictModel):
    """Preference optimisation of config.base on {prompt, chosen, rejected} JSONL pairs."""

    base: str = ""  # the starting policy and reference: a decoder, usually the SFT model
    train_file: str = ""
    eval_file: str | None = None  # held-out pairs: implicit-reward accuracy and margin are reported on them
    beta: float = Field(0.1, gt=0.0)  # DPO: KL strength; IPO: the target log-ratio margin is 1/(2*beta)
    kind: Kind = "sigmoid"  # sigmoid = DPO (Rafailov et al. eq. 7); ipo = Azar et al. eq. 17
    # weight of the chosen replies' NLL added to the loss (RPO, Pang et al. 2024; Llama 3): per chosen token, as
    # trl's loss_type=["sigmoid", "sft"] with loss_weights=[1, sft_weight]. It keeps the chosen log-probs from
    # falling, which plain DPO only constrains relative to the rejected ones
    sft_weight: float = Field(0.0, ge=0.0)
    template: str = "lmforge"
    max_len: int = Field(256, ge=2)
    skip_bad_lines: bool = False
    peft: PeftConfig | None = None  # parameter-efficient DPO (LoRA, ...)
    train: TrainConfig = TrainConfig(out_dir="runs/dpo", max_steps=200, lr=1e-4, min_lr=1e-5, warmup_steps=20,
                                     batch_size=8, weight_decay=0.0, eval_every=50, save_every=100)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, kind: Kind = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards [B], rejected rewards [B]) from per-sequence summed log-probs log pi(y|x).

    With h = log pi(y_c|x)/pi_ref(y_c|x) - log pi(y_r|x)/pi_ref(y_r|x):
    sigmoid: -log sigma(beta * h) (Rafailov et al. 2023, eq. 7);
    ipo: (h - 1/(2*beta))^2 (Azar et al. 2023, eq. 17), on summed log-probs as in the paper (some libraries
    average them per token instead, which changes the scale of h and so the meaning of beta).
    The implicit rewards beta * log pi/pi_ref (Rafailov et al. sec. 5) are detached: they are for logging."""
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss kind {kind!r}; expected 'sigmoid' or 'ipo'")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_batch_loss(model: nn.Module, batch: Batch, *, beta: float, kind: Kind = "sigmoid",
                   sft_weight: float = 0.0) -> LossResult:
    """The trainer's loss, summed over pairs: one policy forward over the stacked pairs (`input_ids`,
    `response_mask`: chosen rows, then rejected) against the precomputed `ref_chosen_logps` / `ref_rejected_logps`,
    plus `sft_weight` times the mean NLL per chosen response token of the micro-batch (trl's "sft" term). Its
    metrics are the implicit rewards' `reward_metrics` and the policy's mean summed log-probs of the chosen and
    rejected replies (`logps/chosen`, `logps/rejected`, as trl logs them)."""
    token_logps = response_logprobs(model, batch["input_ids"], batch["response_mask"])
    chosen_tokens, _ = token_logps.chunk(2)
    chosen, rejected = token_logps.sum(-1).chunk(2)
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, batch["ref_chosen_logps"],
                                                      batch["ref_rejected_logps"], beta, kind)
    metrics = {**reward_metrics(chosen_rewards, rejected_rewards), "logps/chosen": chosen.detach().float().mean(),
               "logps/rejected": rejected.detach().float().mean()}
    if sft_weight > 0:
        chosen_mask, _ = batch["response_mask"][:, 1:].chunk(2)
        nll = -chosen_tokens.float().sum() / chosen_mask.sum().clamp(min=1)
        loss = loss + sft_weight * nll
        metrics["nll/chosen"] = nll.detach()
    return LossResult(loss * len(chosen), len(chosen), metrics)


def reference_logps(reference: nn.Module, batches: Iterable[Batch], precision: str = "fp32") -> Tensor:
    """log pi_ref(y|x) of every pair in `batches` (stacked layout), in order: [N, 2] (chosen, rejected), fp32 on the
    CPU. Run under the training precision, so that policy and reference start from identical numbers."""
    device = next(reference.parameters()).device
    out = []
    for batch in batches:
        with torch.inference_mode(), autocast(device, precision):
            logps = sequence_logprob(reference, batch["input_ids"].to(device), batch["response_mask"].to(device))
            out.append(torch.stack(logps.float().chunk(2), dim=1).cpu())
    return torch.cat(out)  # outside inference mode: a normal tensor the training batches can index


def with_reference(batch: Batch, ref: Tensor) -> Batch:
    """`batch` plus its pairs' reference log-probs ([B, 2] rows of `reference_logps`)."""
    return {**batch, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}


@torch.inference_mode()
def preference_metrics(model: nn.Module, batches: Iterable[Batch], beta: float, precision: str = "fp32"
                       ) -> dict[str, float]:
    """Held-out implicit-reward accuracy (chosen reward > rejected), mean margin, and the mean change of the chosen
    and of the rejected replies' log-probs from the reference's (`chosen_logp_change`, `rejected_logp_change`: DPO
    widens their gap, and may do so by lowering both), under the precision the reference log-probs were computed in
    (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    margin = chosen_change = rejected_change = 0.0
    for batch in batches:
        with autocast(device, precision):
            policy = sequence_logprob(model, batch["input_ids"].to(device), batch["response_mask"].to(device))
        chosen, rejected = policy.float().cpu().chunk(2)
        chosen_ratio, rejected_ratio = chosen - batch["ref_chosen_logps"], rejected - batch["ref_rejected_logps"]
        diff = beta * (chosen_ratio - rejected_ratio)
        correct += int((diff > 0).sum())
        margin += float(diff.sum())
        chosen_change += float(chosen_ratio.sum())
        rejected_change += float(rejected_ratio.sum())
        total += len(diff)
    model.train(was_training)
    n = max(total, 1)
    return {"reward_accuracy": correct / n, "reward_margin": margin / n, "chosen_logp_change": chosen_change / n,
            "rejected_logp_change": rejected_change / n}


def train_dpo(config: DPOConfig, resume: bool = False,
              accept_config_change: bool = False) -> tuple[TrainResult, dict[str, float]]:
    """DPO/IPO-train config.base on config.train_file; (train result, held-out metrics on config.eval_file)."""
    if not config.base or not config.train_file:
        raise ConfigError("DPO needs a starting policy (--base DIR) and preference pairs (--train-file FILE)")
    policy, tokenizer = load_decoder(config.base, "DPO")
    require_fits(policy, config.base, config.max_len, config.max_len)  # log-probs read all but the last token
    if config.peft is not None:  # before the reference copy: the reference is the starting policy, adapters and all
        report(apply_peft(policy, config.peft))
    for module in policy.modules():  # dropout would make pi/pi_ref differ on identical weights
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    pad_id, tcfg = pad_id_of(tokenizer), config.train
    read = pair_reader(config, tokenizer)
    examples = read(config.train_file)
    eval_examples = read(config.eval_file) if config.eval_file else []
    eval_batches = list(ordered_pair_batches(eval_examples, tcfg.batch_size, pad_id))

    device = resolve_device(tcfg.device)
    ctx = init_distributed(device, tcfg.parallel)  # as the trainer will (idempotent): each rank scores on its own GPU
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    reference = frozen_copy(policy).to(device)  # one pass over every pair, then freed
    ref_train = reference_logps(reference, ordered_pair_batches(examples, tcfg.batch_size, pad_id), tcfg.precision)
    if eval_batches:
        ref_eval = reference_logps(reference, eval_batches, tcfg.precision)
        eval_batches = [with_reference(b, r) for b, r in zip(eval_batches, ref_eval.split(tcfg.batch_size),
                                                             strict=True)]
    del reference

    sampler = EpochSampler(len(examples), tcfg.batch_size, tcfg.seed)

    def batch_at(index: int) -> Batch:
        rows = sampler.batch_ids(index)
        return with_reference(collate_pairs([examples[i] for i in rows], pad_id), ref_train[torch.from_numpy(rows)])

    loss_fn = partial(dpo_batch_loss, beta=config.beta, kind=config.kind, sft_weight=config.sft_weight)
    val = first_batches(eval_batches, tcfg.eval_batches) if eval_batches else None
    run_config = CheckpointManifest.of_run("dpo", config, model=policy.cfg, peft=config.peft)
    final_eval = partial(preference_metrics, batches=eval_batches, beta=config.beta, precision=tcfg.precision)
    result = train(policy, tcfg, batch_at, loss_fn, run_config=run_config,
                   tokenizer=tokenizer, val_batches=val, resume=resume, accept_config_change=accept_config_change,
                   perplexity=False, final_eval=final_eval if eval_batches else None)
    return result, result.eval_metrics
