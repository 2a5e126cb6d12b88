"""The grid of `lmforge scaling`: one pretraining run per (model size, token budget), each through `pretrain`.

Every run has its own cosine schedule ending at its budget (Hoffmann et al.: a schedule longer than the run
overstates the loss of short runs). A finished run leaves `scaling_point.json` in its dir and is reused on the next
call; an interrupted one resumes from its last checkpoint. N counts non-embedding parameters (token and position
embeddings left out, as Kaplan et al. 2020), D the tokens the run trained on (steps x batch x sequence length).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.checkpoint import LATEST_FILE
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_text

POINT_FILE = "scaling_point.json"
HEAD_DIM = 16  # heads = d_model / 16 (at least 1)


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    n_layer: int

    @property
    def name(self) -> str:
        return f"{self.d_model}x{self.n_layer}"

    @classmethod
    def parse(cls, text: str) -> ModelSize:
        """`64x2`: d_model 64, 2 layers."""
        d_model, sep, n_layer = text.strip().partition("x")
        if not (sep and d_model.isdigit() and n_layer.isdigit() and int(d_model) >= HEAD_DIM and int(n_layer) >= 1):
            raise ConfigError(f"--sizes: '{text}' is not D_MODELxLAYERS with d_model >= {HEAD_DIM} and layers >= 1; "
                              "write e.g. --sizes 32x1,64x2,96x3")
        return cls(int(d_model), int(n_layer))


@dataclass(frozen=True)
class GridSettings:
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    eval_batches: int = 16
    device: str = "auto"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


@dataclass(frozen=True)
class GridPoint:
    """One finished run: N non-embedding parameters trained on D tokens, its held-out loss."""

    size: str
    params: int  # N, non-embedding
    tokens: int  # D
    steps: int
    val_loss: float
    train_loss: float
    seconds: float
    run_dir: str
    reused: bool = False

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens


def non_embedding_params(model: object) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "emb" not in name and "lm_head" not in name)


def _recipe(settings: GridSettings) -> dict:
    """The settings a reused run must share (the device it ran on does not matter)."""
    return {k: v for k, v in asdict(settings).items() if k != "device"}


def steps_for(budget: float, settings: GridSettings) -> int:
    return max(1, math.ceil(budget / settings.tokens_per_step))


def run_point(size: ModelSize, budget: float, data_dir: Path, runs_dir: Path, settings: GridSettings,
              vocab_size: int) -> GridPoint:
    """Train (or reuse, or resume) the run of `size` on `budget` tokens; its held-out loss at the end."""
    from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
    from lmforge.model import build_model
    from lmforge.train.pretrain import pretrain

    steps = steps_for(budget, settings)
    run_dir = runs_dir / f"{size.name}_{steps * settings.tokens_per_step}tok"
    record = run_dir / POINT_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["settings"] != _recipe(settings):
            raise ConfigError(f"{run_dir} was trained with {saved['settings']}, not {_recipe(settings)}; pass another "
                              "--out-dir, or the settings it was trained with")
        return GridPoint(**saved["point"], reused=True)
    model_cfg = ModelConfig(family="gpt2", vocab_size=vocab_size, max_seq_len=settings.seq_len, n_layer=size.n_layer,
                            n_head=max(1, size.d_model // HEAD_DIM), d_model=size.d_model)
    config = PretrainConfig(model=model_cfg, data=DataConfig(dir=str(data_dir)), train=TrainConfig(
        out_dir=str(run_dir), seed=settings.seed, batch_size=settings.batch_size, max_steps=steps, lr=settings.lr,
        min_lr=settings.lr / 10, warmup_steps=max(1, steps // 10), eval_every=steps, save_every=steps,
        eval_batches=settings.eval_batches, log_every=steps, progress=False, device=settings.device))
    t0 = time.perf_counter()
    result = pretrain(config, resume=(run_dir / LATEST_FILE).is_file())
    if result.val_loss is None:
        raise DataError(f"{data_dir} has no validation split of at least {settings.seq_len + 1} tokens, and the fit "
                        "needs held-out losses; prepare the data with `lmforge data prepare --val-fraction 0.02`")
    point = GridPoint(size.name, non_embedding_params(build_model(model_cfg)), steps * settings.tokens_per_step,
                      steps, result.val_loss, result.train_loss, time.perf_counter() - t0, str(run_dir))
    saved = {k: v for k, v in asdict(point).items() if k != "reused"}
    atomic_write_text(record, json.dumps({"point": saved, "settings": _recipe(settings)}) + "\n")
    return point


def run_grid(sizes: list[ModelSize], budgets: list[float], data_dir: Path, runs_dir: Path, settings: GridSettings,
             vocab_size: int, log: Callable[[str], None] = print) -> list[GridPoint]:
    points = []
    for i, (size, budget) in enumerate(((s, b) for s in sizes for b in budgets), start=1):
        point = run_point(size, budget, data_dir, runs_dir, settings, vocab_size)
        how = "reused" if point.reused else f"{point.seconds:.1f} s"
        log(f"[{i}/{len(sizes) * len(budgets)}] {size.name}: N = {point.params:,}, D = {point.tokens:,} tokens "
            f"({point.steps} steps): val loss {point.val_loss:.4f} ({how})")
        points.append(point)
    return points
