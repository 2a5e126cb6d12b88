"""The one training loop every training stage uses: a stage supplies batches and a loss.

`batch_at(i)` must return the i-th micro-batch of a deterministic stream (a pure function of i):
together with the saved optimizer and RNG state, that is what makes `resume=True` continue a
killed run to bit-identical weights.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmforge.checkpoint import (
    LATEST_FILE,
    load_weights,
    read_training_state,
    remove_stale_temp_dirs,
    resolve_checkpoint,
    write_training_checkpoint,
)
from lmforge.config import TrainConfig
from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.tokenizer import Tokenizer
from lmforge.train.config_change import check_resume_config, record_config_change
from lmforge.train.distributed import DistContext, gather_objects, init_distributed, sum_across_ranks
from lmforge.train.early_stopping import EarlyStopping
from lmforge.train.loss import LossResult, log_dtype
from lmforge.train.metrics_log import MetricsLog
from lmforge.train.run_lock import run_dir_lock

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], LossResult]


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    checkpoint: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)  # `final_eval`'s, after the last step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast context (fp32 master weights), or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only, never on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable[Batch], device: torch.device,
             precision: str) -> float:
    """The loss over all of `batches`' loss-bearing tokens (or items), in eval mode (the model's mode is restored
    after)."""
    was_training = model.training
    model.eval()
    total, count, n = 0.0, 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            result = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
        total += float(result.total)
        count += float(result.count)
        n += 1
    model.train(was_training)
    if n == 0:
        raise TrainingError("validation produced no batches; check the validation split")
    return total / count if count else math.nan


@dataclass
class StepStats:
    loss: float  # summed loss / count over the step's micro-batches on every rank
    metrics: dict[str, float]  # the loss function's metrics, averaged over micro-batches and ranks
    tokens: int  # input tokens the step read, all ranks together


def accumulate_gradients(step: int, cfg: TrainConfig, ctx: DistContext, device: torch.device,
                         batch_at: Callable[[int], Batch], loss_fn: LossFn, ddp_model: torch.nn.Module,
                         forward_model: torch.nn.Module, params: list[torch.Tensor]) -> StepStats:
    """Forward and backward every micro-batch of optimizer step `step`, then scale the summed gradients to the
    mean over all loss-bearing tokens (or items) of the step on all ranks: the gradient of the whole batch,
    however it is split into micro-batches and ranks. With one micro-batch the count is known before the
    backward, which divides by it as a mean-reduced loss does (the same gradients, bit for bit, in one process)."""
    sums, keys, tokens = None, [], 0  # sums: [total, count, *metrics] over the micro-batches
    for micro in range(cfg.grad_accum):
        index = (step * cfg.grad_accum + micro) * ctx.world_size + ctx.rank
        batch = {k: v.to(device, non_blocking=True) for k, v in batch_at(index).items()}
        # under DDP, gradients are all-reduced on the last micro-batch only
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last or not ctx.enabled else ddp_model.no_sync():
            with autocast(device, cfg.precision):
                result = loss_fn(forward_model, batch)
            if cfg.grad_accum == 1:
                count = sum_across_ranks(torch.as_tensor(result.count, device=device).to(result.total.dtype), ctx)
                (result.total / count * ctx.world_size).backward()
            else:
                result.total.backward()
        keys = sorted(result.metrics)
        values = torch.stack([torch.as_tensor(value, device=device).detach().to(log_dtype(device)) for value in
                              (result.total, result.count, *(result.metrics[k] for k in keys))])
        sums = values if sums is None else sums + values
        tokens += batch["input_ids"].numel() * ctx.world_size
    sums = sum_across_ranks(sums, ctx)
    if cfg.grad_accum > 1:
        scale = (ctx.world_size / sums[1]).float()  # DDP averaged the ranks' summed gradients: this makes the mean
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    loss = sums[0].float() / sums[1].float()  # in the loss's precision: one micro-batch logs the loss's own mean
    loss, *means = torch.cat([loss.to(sums.dtype).reshape(1), sums[2:] / (cfg.grad_accum * ctx.world_size)]).tolist()
    return StepStats(loss, dict(zip(keys, means, strict=True)), tokens)  # one device-to-host copy per step


def _restore_latest(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    run_config: BaseModel, ctx: DistContext, device: torch.device,
                    accept_config_change: bool) -> tuple[int, int, Path]:
    """Load the latest checkpoint of `run_dir` into `model`, `optimizer` and the RNGs after checking it, and the
    config's changes, completely; (step, tokens seen, checkpoint dir)."""
    ckpt = resolve_checkpoint(run_dir)
    state, opt_state, rng = read_training_state(ckpt)  # validates every file before changing anything
    if len(rng["torch"]) != ctx.world_size:
        raise CheckpointError(f"{ckpt} was written by {len(rng['torch'])} processes; resume it with as many "
                              f"(this run has {ctx.world_size}) so the result stays exact")
    if cfg.max_steps < state["step"]:
        raise ConfigError(f"--resume: train.max_steps={cfg.max_steps} is below step {state['step']} of {ckpt}, "
                          f"where the run resumes; set train.max_steps to {state['step']} or more")
    changes = check_resume_config(ckpt, run_config, run_dir, accept_config_change)
    load_weights(model, ckpt)
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng["torch"][ctx.rank])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][ctx.rank], device)
    if changes and ctx.is_main:
        record_config_change(run_dir, ckpt, state["step"], changes)
    return state["step"], state["tokens_seen"], ckpt


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batch_at: Callable[[int], Batch],
    loss_fn: LossFn,
    *,
    run_config: BaseModel,
    tokenizer: Tokenizer | None = None,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    resume: bool = False,
    accept_config_change: bool = False,
    perplexity: bool = True,
    final_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `model` for cfg.max_steps optimizer steps, checkpointing into cfg.out_dir.

    `loss_fn` returns a `LossResult`; its metrics are logged with the loss, averaged over micro-batches and ranks.
    `run_config` is saved as config.yaml in every checkpoint: a `CheckpointManifest` (or a config whose YAML is
    one, such as PretrainConfig), so the checkpoint loads with `lmforge.load`. `perplexity` adds exp(val loss) to
    the log: meaningful for language-model losses only. `final_eval(model)` scores the trained model once after the last
    step (held-out accuracy, say); its values are logged as `eval_<name>` and returned in `eval_metrics`. The run
    holds cfg.out_dir's lock throughout (rank 0 for all ranks). On `resume`, a config that differs from the
    checkpoint's in a key that changes the run is refused
    unless `accept_config_change` (see `lmforge.train.config_change`)."""
    run_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if cfg.early_stopping_patience and val_batches is None:
        raise ConfigError(f"train.early_stopping_patience={cfg.early_stopping_patience} needs a validation loss, and "
                          "this run has no validation data (e.g. prepare the data with a larger --val-fraction)")
    if resume and not (run_dir / LATEST_FILE).is_file():  # before the lock creates the dir
        raise CheckpointError(f"--resume: no checkpoint in {run_dir} (missing {run_dir / LATEST_FILE})")
    with run_dir_lock(run_dir) if ctx.is_main else nullcontext():
        latest = run_dir / LATEST_FILE
        if not resume and latest.is_file():
            raise CheckpointError(f"{run_dir} already holds a run (latest: {latest.read_text().strip()}); pass "
                                  "--resume to continue it, or pick another train.out_dir (nothing was changed)")
        if ctx.is_main:
            remove_stale_temp_dirs(run_dir)
        return _train_holding_lock(model, cfg, batch_at, loss_fn, run_config=run_config, tokenizer=tokenizer,
                                   val_batches=val_batches, resume=resume, accept_config_change=accept_config_change,
                                   perplexity=perplexity, final_eval=final_eval, ctx=ctx, device=device)


@dataclass
class _Run:
    """A training run in progress: the model (bare, and as the loss calls it), its optimizer and the run's log."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # DistributedDataParallel(model) under torchrun, else model
    forward_model: torch.nn.Module  # ddp_model, compiled when cfg.compile
    optimizer: torch.optim.Optimizer
    metrics: MetricsLog | None  # rank 0 only
    tokenizer: Tokenizer | None
    run_config: BaseModel
    start_step: int
    tokens_seen: int
    last_checkpoint: Path | None = None

    @functools.cached_property
    def params(self) -> list[torch.Tensor]:
        """The trained parameters (the optimizer's groups never change during a run)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _set_up(model: torch.nn.Module, cfg: TrainConfig, run_config: BaseModel, tokenizer: Tokenizer | None,
            resume: bool, accept_config_change: bool, ctx: DistContext, device: torch.device) -> _Run:
    """The model on its device with its optimizer, restored from the latest checkpoint on `resume` (a fresh run
    saves step 0), wrapped for DDP and torch.compile, and the run's metrics log opened."""
    run_dir = Path(cfg.out_dir)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    start_step, tokens_seen, resumed_from = 0, 0, None
    if resume:
        start_step, tokens_seen, resumed_from = _restore_latest(run_dir, model, optimizer, cfg, run_config, ctx,
                                                                device, accept_config_change)
    elif ctx.enabled:
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # each rank its own dropout noise
    ddp_model = DistributedDataParallel(model) if ctx.enabled else model
    forward_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    metrics = MetricsLog(run_dir, start_step if resume else None, cfg.tensorboard) if ctx.is_main else None
    run = _Run(cfg, ctx, device, model, ddp_model, forward_model, optimizer, metrics, tokenizer, run_config,
               start_step, tokens_seen)
    run.last_checkpoint = resumed_from or _save(run, 0)
    return run


def _save(run: _Run, step: int) -> Path:
    """Checkpoint `step` with every rank's RNG state (collective: all ranks call it; rank 0 writes)."""
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    states = gather_objects(rng, run.ctx)
    run_dir = Path(run.cfg.out_dir)
    if not run.ctx.is_main:
        return run_dir / "checkpoints" / f"step_{step:08d}"
    return write_training_checkpoint(run_dir, step, run.model, run.tokenizer, run.run_config, run.optimizer,
                                     {"tokens_seen": run.tokens_seen}, {key: [s[key] for s in states] for key in rng},
                                     run.cfg.keep_checkpoints)


def _optimizer_step(run: _Run, step: int, batch_at: Callable[[int], Batch], loss_fn: LossFn
                    ) -> tuple[StepStats, float, float]:
    """Optimizer step `step` (0-based): the schedule's learning rate, the step's gradients, clipping and the
    update; a loss that is not finite stops the run before the weights change. (stats, lr, grad norm)."""
    cfg = run.cfg
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    stats = accumulate_gradients(step, cfg, run.ctx, run.device, batch_at, loss_fn, run.ddp_model,
                                 run.forward_model, run.params)
    if not math.isfinite(stats.loss):
        run.close()
        raise TrainingError(f"loss became {stats.loss} at step {step + 1}; stopped. The last good checkpoint, "
                            f"{run.last_checkpoint}, is intact: lower train.lr, raise train.warmup_steps, or check "
                            "the data.")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.tokens_seen += stats.tokens
    return stats, lr, float(grad_norm)


def _validate(run: _Run, loss_fn: LossFn, batches: Iterable[Batch], step: int, perplexity: bool) -> tuple[float, str]:
    """The validation loss after `step`, logged (with its perplexity for a language-model loss, in nats per
    token); (loss, a line for the user)."""
    val_loss = evaluate(run.model, loss_fn, batches, run.device, run.cfg.precision)
    record = {"step": step, "val_loss": val_loss}
    if perplexity:
        record["val_ppl"] = math.exp(min(val_loss, 50.0))
    run.log(record)
    ppl = f", perplexity {record['val_ppl']:.2f}" if perplexity else ""
    return val_loss, f"step {step}: val loss {val_loss:.4f}{ppl}"


def _train_holding_lock(model: torch.nn.Module, cfg: TrainConfig, batch_at: Callable[[int], Batch], loss_fn: LossFn,
                        *, run_config: BaseModel, tokenizer: Tokenizer | None,
                        val_batches: Callable[[], Iterable[Batch]] | None, resume: bool, accept_config_change: bool,
                        perplexity: bool, final_eval: Callable[[torch.nn.Module], dict[str, float]] | None,
                        ctx: DistContext, device: torch.device) -> TrainResult:
    run = _set_up(model, cfg, run_config, tokenizer, resume, accept_config_change, ctx, device)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not (cfg.progress and ctx.is_main),
               desc="train", unit="step")
    loss, val_loss, tokens_per_s = float("nan"), None, 0.0
    window_tokens, window_time = 0, 0.0  # throughput counts training steps only, not eval or saving
    stopper = EarlyStopping.for_run(cfg, Path(cfg.out_dir), run.start_step if resume else None)
    last_step = run.start_step if stopper.stopped else cfg.max_steps  # a resumed run that had stopped stays stopped
    for step in range(run.start_step, last_step):
        t0 = time.perf_counter()
        stats, lr, grad_norm = _optimizer_step(run, step, batch_at, loss_fn)
        window_time += time.perf_counter() - t0
        window_tokens += stats.tokens
        loss, done = stats.loss, step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            tokens_per_s = window_tokens / max(window_time, 1e-9)
            run.log({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": run.tokens_seen,
                     "tokens_per_s": tokens_per_s, **stats.metrics})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            window_tokens, window_time = 0, 0.0
        if val_batches is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            val_loss, line = _validate(run, loss_fn, val_batches(), done, perplexity)
            if stopper.update(val_loss):
                last_step = done
                line += (f"; early stopping: no improvement on {stopper.best:.4f} for {stopper.patience} "
                         "evaluations")
            if ctx.is_main:
                bar.write(line)
        if done % cfg.save_every == 0 or done in (cfg.max_steps, last_step):
            run.last_checkpoint = _save(run, done)
        if done == last_step:
            break
    bar.close()
    scores = final_eval(model) if final_eval is not None else {}
    if scores:
        run.log({"step": last_step, **{f"eval_{name}": value for name, value in scores.items()}})
    run.close()
    return TrainResult(last_step, loss, val_loss, tokens_per_s, run.last_checkpoint, scores)
