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
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmforge.checkpoint import (
    LATEST_FILE,
    SHARDED_DIR,
    load_weights,
    read_training_state,
    remove_stale_temp_dirs,
    resolve_checkpoint,
    sharded_temp_dir,
    write_training_checkpoint,
)
from lmforge.config import TrainConfig
from lmforge.cpu_threads import set_cpu_threads
from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.model.activation_checkpointing import set_activation_checkpointing
from lmforge.model.layers import set_compiled_activations
from lmforge.sharded import gathered_weights, load_sharded, save_sharded
from lmforge.tokenizer import Tokenizer
from lmforge.train.config_change import check_resume_config, record_config_change
from lmforge.train.distributed import (
    DistContext,
    gather_objects,
    grad_accum_at,
    gradient_sync_off,
    init_distributed,
    shard_model,
    sum_across_ranks,
)
from lmforge.train.early_stopping import EarlyStopping
from lmforge.train.loss import LossResult, log_dtype
from lmforge.train.metrics_log import MetricsLog
from lmforge.train.mfu import matmul_peak_flops, training_flops_per_token
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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast context (the weights stay fp32: the master copy the optimizer updates), or a no-op
    for fp32."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


def new_grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler (Micikevicius et al. 2018): the loss is multiplied by the scale before the
    backward, so small gradients do not underflow fp16; disabled (a pass-through) in any other precision."""
    return torch.amp.GradScaler(device.type, init_scale=cfg.loss_scale_init,
                                growth_interval=cfg.loss_scale_growth_interval, enabled=cfg.precision == "fp16")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only, never on biases or norm gains. The fused kernel (one pass
    over every parameter's weights, gradient and moments) where PyTorch has one for the parameters' device, else the
    foreach one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
                             foreach=None if fused else True)


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
    flops: int | None  # the model's training FLOPs for those tokens, None for a model that does not count them


def accumulate_gradients(step: int, cfg: TrainConfig, ctx: DistContext, device: torch.device,
                         batch_at: Callable[[int], Batch], loss_fn: LossFn, ddp_model: torch.nn.Module,
                         forward_model: torch.nn.Module, params: list[torch.Tensor],
                         scaler: torch.amp.GradScaler | None = None) -> StepStats:
    """Forward and backward every micro-batch of optimizer step `step`, then scale the summed gradients to the
    mean over all loss-bearing tokens (or items) of the step on all ranks: the gradient of the whole batch,
    however it is split into micro-batches and ranks. With one micro-batch the count is known before the
    backward, which divides by it as a mean-reduced loss does (the same gradients, bit for bit, in one process).
    An enabled `scaler` multiplies each loss by the loss scale before its backward (the gradients stay scaled)."""
    scale_loss = scaler.scale if scaler is not None else (lambda loss: loss)
    sums, keys, tokens, flops = None, [], 0, 0  # sums: [total, count, *metrics] over the micro-batches
    for micro in range(cfg.grad_accum):
        index = (step * cfg.grad_accum + micro) * ctx.world_size + ctx.rank
        batch = {k: v.to(device, non_blocking=True) for k, v in batch_at(index).items()}
        # under DDP and FSDP, gradients are reduced across ranks on the last micro-batch only
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last or not ctx.enabled else gradient_sync_off(ddp_model):
            with autocast(device, cfg.precision):
                result = loss_fn(forward_model, batch)
            if cfg.grad_accum == 1:
                count = sum_across_ranks(torch.as_tensor(result.count, device=device).to(result.total.dtype), ctx)
                scale_loss(result.total / count * ctx.world_size).backward()
            else:
                scale_loss(result.total).backward()
        keys = sorted(result.metrics)
        values = torch.stack([torch.as_tensor(value, device=device).detach().to(log_dtype(device)) for value in
                              (result.total, result.count, *(result.metrics[k] for k in keys))])
        sums = values if sums is None else sums + values
        tokens += batch["input_ids"].numel() * ctx.world_size
        per_token = training_flops_per_token(forward_model, batch["input_ids"].shape[-1])
        flops = None if per_token is None or flops is None else flops + per_token * batch["input_ids"].numel()
    sums = sum_across_ranks(sums, ctx)
    if cfg.grad_accum > 1:
        scale = (ctx.world_size / sums[1]).float()  # DDP/FSDP averaged the ranks' sums: this makes the mean
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    loss = sums[0].float() / sums[1].float()  # in the loss's precision: one micro-batch logs the loss's own mean
    loss, *means = torch.cat([loss.to(sums.dtype).reshape(1), sums[2:] / (cfg.grad_accum * ctx.world_size)]).tolist()
    flops = None if flops is None else flops * ctx.world_size
    return StepStats(loss, dict(zip(keys, means, strict=True)), tokens, flops)  # one device-to-host copy per step


def _restore_latest(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, cfg: TrainConfig, run_config: BaseModel, ctx: DistContext,
                    device: torch.device, accept_config_change: bool) -> tuple[dict[str, Any], Path]:
    """Load the latest checkpoint of `run_dir` into `model`, `optimizer`, the loss scaler and the RNGs after
    checking it, and the config's changes, completely; (its trainer state, with the accumulation steps that keep
    its global batch at this world size as `grad_accum`; checkpoint dir). At another world size the global batch is
    the same rows; a rank the checkpoint has no RNG state for seeds its own (dropout noise then differs from the
    saved run)."""
    ckpt = resolve_checkpoint(run_dir)
    state, opt_state, rng = read_training_state(ckpt)  # validates every file before changing anything
    state.setdefault("launch_world_size", len(rng["torch"]))  # checkpoints before elastic resume
    state["grad_accum"] = grad_accum_at(cfg.grad_accum, state["launch_world_size"], ctx, ckpt)
    sharded = (ckpt / SHARDED_DIR).is_dir()
    if sharded != (cfg.parallel == "fsdp"):
        raise CheckpointError(f"{ckpt} was saved by a train.parallel: {'fsdp' if sharded else 'ddp'} run; resume it "
                              "with that setting")
    if cfg.max_steps < state["step"]:
        raise ConfigError(f"--resume: train.max_steps={cfg.max_steps} is below step {state['step']} of {ckpt}, "
                          f"where the run resumes; set train.max_steps to {state['step']} or more")
    changes = check_resume_config(ckpt, run_config, run_dir, accept_config_change)
    if sharded:
        load_sharded(model, optimizer, ckpt / SHARDED_DIR)
    else:
        load_weights(model, ckpt)
        optimizer.load_state_dict(opt_state)
    if scaler.is_enabled() and "grad_scaler" in state:  # an fp32/bf16 checkpoint resumed in fp16 starts afresh
        scaler.load_state_dict(state["grad_scaler"])
    if ctx.rank < len(rng["torch"]):
        torch.set_rng_state(rng["torch"][ctx.rank])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][ctx.rank], device)
    else:
        torch.manual_seed(cfg.seed + 1 + ctx.rank)
    if changes and ctx.is_main:
        record_config_change(run_dir, ckpt, state["step"], changes)
    return state, ckpt


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
    ctx = init_distributed(device, cfg.parallel)
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
    ddp_model: torch.nn.Module  # DistributedDataParallel(model) under torchrun with DDP, else model
    forward_model: torch.nn.Module  # ddp_model, compiled when cfg.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaler; disabled in other precisions
    metrics: MetricsLog | None  # rank 0 only
    tokenizer: Tokenizer | None
    run_config: BaseModel
    start_step: int
    tokens_seen: int
    launch_world_size: int  # the ranks train.grad_accum is for: cfg.grad_accum is scaled to keep the global batch
    skipped_steps: int = 0  # fp16 steps skipped for inf/nan gradients, over the whole run
    last_checkpoint: Path | None = None

    @functools.cached_property
    def params(self) -> list[torch.Tensor]:
        """The trained parameters (the optimizer's groups never change during a run)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @functools.cached_property
    def peak_flops(self) -> float:
        """The peak FLOP/s of all ranks together, for MFU: `train.peak_flops` per device, or a square matmul's rate
        measured on this device in the run's precision (once per process)."""
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision, torch.float32)
        per_device = self.cfg.peak_flops or matmul_peak_flops(self.device, dtype)
        return per_device * self.ctx.world_size

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _set_up(model: torch.nn.Module, cfg: TrainConfig, run_config: BaseModel, tokenizer: Tokenizer | None,
            resume: bool, accept_config_change: bool, ctx: DistContext, device: torch.device) -> _Run:
    """The model on its device (sharded under FSDP) with its optimizer, restored from the latest checkpoint on
    `resume` (a fresh run saves step 0), wrapped for DDP and torch.compile, and the run's metrics log opened."""
    run_dir = Path(cfg.out_dir)
    # The same thread count, set explicitly: SDPA's CPU backward (torch 2.13) splits its work differently before a
    # process's first set_num_threads call than after it, so a second run of one config in a process that changed
    # its threads in between (the demo's serving stage does) would differ from the first in the last bits. It also
    # makes MKL's first vector-math call of the process before the model's attention (see lmforge.cpu_threads).
    set_cpu_threads(torch.get_num_threads())
    model.to(device).train()
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    set_compiled_activations(model, cfg.compile_activations)
    if cfg.parallel == "fsdp":
        shard_model(model, device, ctx)
    optimizer = build_optimizer(model, cfg)
    scaler = new_grad_scaler(cfg, device)
    state, resumed_from = {"step": 0, "tokens_seen": 0, "launch_world_size": ctx.world_size}, None
    if resume:
        state, resumed_from = _restore_latest(run_dir, model, optimizer, scaler, cfg, run_config, ctx, device,
                                              accept_config_change)
        cfg = cfg.model_copy(update={"grad_accum": state["grad_accum"]})
    elif ctx.enabled:
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # each rank its own dropout noise
    ddp_model = DistributedDataParallel(model) if ctx.enabled and cfg.parallel == "ddp" else model
    forward_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    metrics = MetricsLog(run_dir, state["step"] if resume else None, cfg.tensorboard) if ctx.is_main else None
    run = _Run(cfg, ctx, device, model, ddp_model, forward_model, optimizer, scaler, metrics, tokenizer, run_config,
               state["step"], state["tokens_seen"], state["launch_world_size"], state.get("skipped_steps", 0))
    run.last_checkpoint = resumed_from or _save(run, 0)
    return run


def _save(run: _Run, step: int) -> Path:
    """Checkpoint `step` with every rank's RNG state (collective: all ranks call it; rank 0 writes). Under FSDP
    every rank writes its shards first, and the last step's weights are gathered into model.safetensors."""
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    states = gather_objects(rng, run.ctx)
    run_dir = Path(run.cfg.out_dir)
    weights, optimizer, sharded = run.model, run.optimizer, None
    if run.cfg.parallel == "fsdp":
        sharded, optimizer = sharded_temp_dir(run_dir, step), None
        save_sharded(run.model, run.optimizer, sharded)
        weights = gathered_weights(run.model) if step == run.cfg.max_steps else None
    if not run.ctx.is_main:
        return run_dir / "checkpoints" / f"step_{step:08d}"
    state: dict[str, Any] = {"tokens_seen": run.tokens_seen, "launch_world_size": run.launch_world_size}
    if run.scaler.is_enabled():
        state |= {"grad_scaler": run.scaler.state_dict(), "skipped_steps": run.skipped_steps}
    return write_training_checkpoint(run_dir, step, weights, run.tokenizer, run.run_config, optimizer, state,
                                     {key: [s[key] for s in states] for key in rng}, run.cfg.keep_checkpoints,
                                     sharded)


def _optimizer_step(run: _Run, step: int, batch_at: Callable[[int], Batch], loss_fn: LossFn
                    ) -> tuple[StepStats, float, float]:
    """Optimizer step `step` (0-based): the schedule's learning rate, the step's gradients, clipping and the
    update; a loss that is not finite stops the run before the weights change. In fp16, the gradients are
    unscaled before clipping, and a step whose gradients hold inf/nan is skipped (the scaler lowers its scale).
    (stats, lr, grad norm)."""
    cfg = run.cfg
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    stats = accumulate_gradients(step, cfg, run.ctx, run.device, batch_at, loss_fn, run.ddp_model,
                                 run.forward_model, run.params, run.scaler)
    if not math.isfinite(stats.loss):
        run.close()
        raise TrainingError(f"loss became {stats.loss} at step {step + 1}; stopped. The last good checkpoint, "
                            f"{run.last_checkpoint}, is intact: lower train.lr, raise train.warmup_steps, or check "
                            "the data.")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)  # no update when the unscaled gradients hold inf/nan
    run.scaler.update()
    run.skipped_steps += int(run.scaler.get_scale() < scale)  # the scale backs off exactly when the step was skipped
    run.optimizer.zero_grad(set_to_none=True)
    run.tokens_seen += stats.tokens
    return stats, lr, float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)


def _loss_scale_record(run: _Run) -> dict[str, float | int]:
    """fp16's loss scale after the latest step and the steps skipped so far, for the log; nothing otherwise."""
    if not run.scaler.is_enabled():
        return {}
    return {"loss_scale": run.scaler.get_scale(), "skipped_steps": run.skipped_steps}


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
    window_tokens, window_flops, window_time = 0, 0, 0.0  # throughput counts training steps only, not eval or saving
    stopper = EarlyStopping.for_run(cfg, Path(cfg.out_dir), run.start_step if resume else None)
    last_step = run.start_step if stopper.stopped else cfg.max_steps  # a resumed run that had stopped stays stopped
    for step in range(run.start_step, last_step):
        t0 = time.perf_counter()
        stats, lr, grad_norm = _optimizer_step(run, step, batch_at, loss_fn)
        window_time += time.perf_counter() - t0
        window_tokens += stats.tokens
        window_flops = None if stats.flops is None or window_flops is None else window_flops + stats.flops
        loss, done = stats.loss, step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            tokens_per_s = window_tokens / max(window_time, 1e-9)
            mfu = {} if window_flops is None else {"mfu": window_flops / max(window_time, 1e-9) / run.peak_flops}
            run.log({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": run.tokens_seen,
                     "tokens_per_s": tokens_per_s, **mfu, **_loss_scale_record(run), **stats.metrics})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            window_tokens, window_flops, window_time = 0, 0, 0.0
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
