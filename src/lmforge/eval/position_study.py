"""Position-encoding study: train one decoder per scheme at length L, then measure perplexity at L, 2L and 4L.

Tests the claim that relative schemes (ALiBi, Press et al. 2022; RoPE, Su et al. 2021) extrapolate past the
training length better than learned absolute positions (GPT-2) or fixed sinusoids (Vaswani et al. 2017).
Every scheme gets the same model size, data, seed, step count, learning-rate schedule and batch, trained by
the shared loop; only `ModelConfig.position` differs. A learned table has exactly L rows, so learned
positions cannot run past L: the study records that as "cannot extrapolate", never as a number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError, DataError
from lmforge.eval.report import Section, markdown_table, plot_series
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import autocast, train

LENGTH_MULTIPLES = (1, 2, 4)  # evaluation lengths, as multiples of the training length L
RELATIVE = ("alibi", "rope")
CANNOT = "cannot extrapolate"
UNTRAINED = 2.0  # ppl@L above this multiple of the best ppl@L: the scheme did not learn comparably in the budget
PLOT_FILE = "position_study.png"


@dataclass
class StudyResult:
    """Per scheme: final training loss and validation perplexity at each evaluation length."""

    train_len: int
    lengths: tuple[int, ...]  # L, 2L, 4L
    eval_tokens: int  # validation tokens predicted at every length (the same tokens at each)
    steps: int
    batch_size: int
    model: dict[str, int]
    train_loss: dict[str, float]
    ppl: dict[str, dict[int, float | None]]  # scheme -> length -> perplexity; None = the scheme cannot run there
    seconds: dict[str, float]  # scheme -> training + evaluation wall time


def eval_windows(tokens: np.ndarray, length: int, max_windows: int) -> torch.Tensor:
    """LongTensor [n, length + 1]: row i is tokens[i*length : i*length + length + 1], from the start of `tokens`.

    Windows step by `length`, so the predicted tokens (each row's last `length`) never overlap, and any two
    lengths dividing n*length predict exactly the same tokens, 1..n*length."""
    n = min(max_windows, (len(tokens) - 1) // length)
    index = np.arange(n, dtype=np.int64)[:, None] * length + np.arange(length + 1, dtype=np.int64)
    return torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))


@torch.inference_mode()
def window_perplexity(model: DecoderLM, windows: torch.Tensor, rows_per_batch: int, precision: str) -> float:
    """exp(mean next-token cross-entropy over every predicted position of every window), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in windows.split(rows_per_batch):
        chunk = chunk.to(device)
        batch = {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}
        with autocast(device, precision):
            loss = causal_lm_loss(model, batch)
        total += loss.total.item()
        count += int(loss.count)
    return math.exp(total / count)


def run_position_study(
    shards_dir: Path,
    out_dir: Path,
    *,
    schemes: Sequence[str] = ("learned", "sinusoidal", "rope", "alibi"),
    train_len: int,
    model: dict[str, int],
    steps: int,
    batch_size: int,
    seed: int,
    precision: str = "fp32",
    eval_tokens: int = 16384,
    progress: bool = False,
) -> StudyResult:
    """Train the same decoder once per scheme (run dir `out_dir/<scheme>`, max_seq_len = train_len) and
    evaluate validation perplexity at lengths L, 2L, 4L.

    Evaluation at length l scores non-overlapping windows of l predicted tokens (`eval_windows`), taken from
    the start of the validation split; every length and every scheme predicts the same first `eval_tokens`
    validation tokens (rounded down to a multiple of 4L). Perplexity is exp of the mean cross-entropy over all
    predicted positions of all windows, so early positions (little context) count as much as late ones."""
    if {"position", "max_seq_len"} & set(model):
        raise ConfigError("the study sets model.position and model.max_seq_len itself; leave them out of `model`")
    shards = load_shards(shards_dir)
    tokenizer = Tokenizer.from_file(Path(shards_dir))
    val = shards.tokens("val")
    lengths = tuple(m * train_len for m in LENGTH_MULTIPLES)
    n_pred = (min(eval_tokens, len(val) - 1) // lengths[-1]) * lengths[-1]
    if n_pred == 0:
        raise DataError(f"the validation split has {len(val)} tokens; evaluating at {lengths[-1]} tokens needs "
                        f"at least {lengths[-1] + 1}: prepare the shards with a larger val_fraction or more data")
    windows = {length: eval_windows(val, length, n_pred // length) for length in lengths}
    train_batches = PackedBatches(shards.tokens("train"), train_len, batch_size, seed=seed)
    result = StudyResult(train_len, lengths, n_pred, steps, batch_size, dict(model), {}, {}, {})
    for scheme in schemes:
        t0 = time.perf_counter()
        mcfg = ModelConfig(**{"family": "gpt2", "vocab_size": shards.vocab_size, **model},
                           position=scheme, max_seq_len=train_len)
        if mcfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} tokens")
        tcfg = TrainConfig(out_dir=str(Path(out_dir) / scheme), seed=seed, batch_size=batch_size, seq_len=train_len,
                           max_steps=steps, warmup_steps=max(1, steps // 20), precision=precision,
                           save_every=steps, keep_checkpoints=1, log_every=max(1, steps // 50), progress=progress)
        config = PretrainConfig(model=mcfg, data=DataConfig(dir=str(shards_dir)), train=tcfg)
        torch.manual_seed(seed)
        net = DecoderLM(mcfg)
        trained = train(net, tcfg, train_batches.batch, causal_lm_loss,
                        run_config=CheckpointManifest.of_run("pretrain", config, model=mcfg), tokenizer=tokenizer)
        result.train_loss[scheme] = trained.train_loss
        result.ppl[scheme] = {
            length: window_perplexity(net, windows[length], max(1, batch_size * train_len // length), precision)
            if scheme != "learned" or length <= train_len else None
            for length in lengths
        }
        result.seconds[scheme] = time.perf_counter() - t0
    return result


def _fmt(ppl: float | None) -> str:
    return CANNOT if ppl is None else f"{ppl:.2f}"


def _summary(r: StudyResult) -> str:
    """2-4 sentences on what this run measured, generated from its numbers."""
    short, far = r.lengths[0], r.lengths[-1]
    at_l = {s: p[short] for s, p in r.ppl.items()}
    best = min(at_l, key=at_l.get)
    text = [f"At the training length ({short} tokens) {best} had the lowest validation perplexity ({at_l[best]:.2f})."]
    lagging = [s for s in at_l if at_l[s] > UNTRAINED * at_l[best]]
    if lagging:
        text.append(", ".join(f"{s} (ppl@{short} {at_l[s]:.2f})" for s in lagging) + f" did not train to within "
                    f"{UNTRAINED:g}x of the best in this budget, so its length ratio says nothing about extrapolation "
                    "and is left out below.")
    growth = {s: p[far] / p[short] for s, p in r.ppl.items() if p[far] is not None and s not in lagging}
    if growth:
        order = sorted(growth, key=growth.get)
        text.append(f"The ratio ppl@{far} / ppl@{short} was lowest for {order[0]} ({at_l[order[0]]:.2f} -> "
                    f"{r.ppl[order[0]][far]:.2f}, x{growth[order[0]]:.2f})"
                    + "".join(f", then {s} (x{growth[s]:.2f})" for s in order[1:]) + ".")
    relative = [s for s in RELATIVE if s in growth]
    absolute = [s for s in growth if s not in RELATIVE]
    parts = []
    if relative and "learned" in r.ppl and r.ppl["learned"][far] is None:
        parts.append(f"learned positions cannot run past {short} tokens at all, so against them it holds by "
                     "construction")
    if relative and absolute:
        ref = min(absolute, key=growth.get)
        better = [s for s in relative if growth[s] < growth[ref]]
        worse = [s for s in relative if s not in better]
        verdicts = []
        if better:
            verdicts.append(" and ".join(f"{s} (x{growth[s]:.2f})" for s in better) + " held up better")
        if worse:
            verdicts.append(" and ".join(f"{s} (x{growth[s]:.2f})" for s in worse) + " did not")
        parts.append(f"against {ref}, the best absolute scheme that runs past {short} tokens (x{growth[ref]:.2f}), "
                     + " while ".join(verdicts))
    if parts:
        text.append("On the claim that relative schemes (ALiBi, RoPE) extrapolate better than absolute positions: "
                    + "; ".join(parts) + ".")
    return " ".join(text)


def position_study_section(result: StudyResult, report_dir: Path) -> Section:
    """Report section: table of train loss and perplexity by evaluation length, a plot, and a generated summary."""
    short, far = result.lengths[0], result.lengths[-1]
    defined = {s: [(n, p) for n, p in ppl.items() if p is not None] for s, ppl in result.ppl.items()}
    values = [p for pts in defined.values() for _, p in pts]
    plot_series(Path(report_dir) / PLOT_FILE, f"perplexity past the training length ({short})",
                "evaluation length (tokens)", "validation perplexity",
                {s: tuple(zip(*pts, strict=True)) for s, pts in defined.items()},
                logy=max(values) / min(values) > 10)
    header = ["position", "final train loss", *(f"ppl @ {m * short} ({m if m > 1 else ''}L)" for m in LENGTH_MULTIPLES),
              f"ppl@{far} / ppl@{short}"]
    rows = [(s, f"{result.train_loss[s]:.4f}", *(_fmt(ppl[n]) for n in result.lengths),
             CANNOT if ppl[far] is None else f"x{ppl[far] / ppl[short]:.2f}") for s, ppl in result.ppl.items()]
    m = result.model
    setup = (f"One GPT-2-style decoder ({m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads) per "
             f"position scheme, each trained {result.steps} steps x {result.batch_size} x {short} tokens with the "
             f"same data, seed and schedule. Perplexity at length l: exp of the mean cross-entropy over every "
             f"position of non-overlapping l-token windows covering the same {result.eval_tokens:,} validation "
             f"tokens at every length.")
    return Section("Position encodings past the training length",
                   "\n\n".join([setup, markdown_table(header, rows), _summary(result)]), images=[PLOT_FILE])
