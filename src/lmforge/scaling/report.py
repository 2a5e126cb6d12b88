"""What `lmforge scaling` reports from a fitted grid: the figures (as JSON), the lines it prints, how far the fit can
be trusted, and the frontier plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from lmforge.scaling.fit import CHINCHILLA_TOKENS_PER_PARAM, N_PARAMS, ScalingFit
from lmforge.scaling.grid import GridPoint

LOOSE_LOG_E = 0.3  # a standard error of log E above this (E within a factor ~1.35 at 1 sigma): poorly identified


def figures(points: list[GridPoint], fit: ScalingFit, budget: float) -> dict:
    """Every figure of the run: the grid, the fit, the compute-optimal N and D for `budget` FLOPs, the trust notes."""
    n_opt, d_opt = fit.optimum(budget)
    return {
        "points": [{**asdict(p), "flops": p.flops} for p in points],
        "n_counts": "non-embedding parameters",
        "fit": fit.as_dict(),
        "optimum": {"flops": budget, "params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
                    "loss": float(fit.loss(n_opt, d_opt)),
                    # D/N grows as C^((alpha - beta) / (alpha + beta)) along the frontier
                    "tokens_per_param_exponent": (fit.alpha - fit.beta) / (fit.alpha + fit.beta),
                    "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM},
        "trust": trust_notes(points, fit, budget),
    }


def _error(stderr: float | None) -> str:
    return "(not identified by this grid)" if stderr is None else f"+/- {stderr:.3g}"


def trust_notes(points: list[GridPoint], fit: ScalingFit, budget: float) -> list[str]:
    """How far a fit from this grid can be trusted, in sentences."""
    n = sorted({p.params for p in points})
    d = sorted({p.tokens for p in points})
    max_flops = max(p.flops for p in points)
    se = fit.stderr
    notes = [f"{len(points)} points for {N_PARAMS} parameters ({len(points) - N_PARAMS} left over); Hoffmann et al. "
             "fitted over 400 runs",
             f"N spans {n[-1] / n[0]:.3g}x ({n[0]:,} to {n[-1]:,} non-embedding parameters) and D {d[-1] / d[0]:.3g}x "
             f"({d[0]:,} to {d[-1]:,} tokens); Chinchilla's runs spanned 70M to 16B parameters",
             f"exponents: alpha = {fit.alpha:.3f} {_error(se['alpha'])}, beta = {fit.beta:.3f} {_error(se['beta'])} "
             "(1 standard error; Chinchilla: 0.34, 0.28)"]
    if se["log_E"] is None or not se["log_E"] < LOOSE_LOG_E or fit.E >= 0.999 * min(p.val_loss for p in points):
        notes.append(f"the irreducible loss E = {fit.E:.3g} is poorly identified (log E {_error(se['log_E'])}): the "
                     "grid stops well before the loss flattens, so E trades off against A and B")
    if budget > max_flops:
        notes.append(f"the budget {budget:.3g} FLOPs is {budget / max_flops:.3g}x the largest run's compute: an "
                     "extrapolation along fitted power laws")
    notes.append("tiny models trained with one learning rate and schedule for every size: the fit describes this "
                 "setup; set its tokens per parameter beside Chinchilla's ~20 as an order of magnitude, not a "
                 "measurement of it")
    return notes


def describe(result: dict) -> list[str]:
    """The lines `lmforge scaling` prints."""
    fit, opt = result["fit"], result["optimum"]
    return [f"fit of L(N, D) = E + A/N^alpha + B/D^beta over {fit['points']} runs (N: non-embedding parameters, "
            "D: training tokens, L: held-out loss in nats/token):",
            f"  E = {fit['E']:.4g}, A = {fit['A']:.4g}, alpha = {fit['alpha']:.4f}, B = {fit['B']:.4g}, beta = "
            f"{fit['beta']:.4f}; rms log residual {fit['rms_log_residual']:.3g}",
            f"compute-optimal for C = {opt['flops']:.4g} FLOPs (C = 6ND): N = {opt['params']:,.0f}, D = "
            f"{opt['tokens']:,.0f} tokens, predicted loss {opt['loss']:.4f}",
            f"  tokens per parameter: {opt['tokens_per_param']:.3g} (Chinchilla: "
            f"~{opt['chinchilla_tokens_per_param']:g}); along the frontier it scales as "
            f"C^{opt['tokens_per_param_exponent']:.3f}",
            "how far to trust it:", *(f"  - {note}" for note in result["trust"])]


def plot_frontier(path: Path, points: list[GridPoint], fit: ScalingFit) -> Path:
    """Loss vs compute: each model size's runs and fitted curve, and the compute-optimal frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    flops = np.array([p.flops for p in points])
    span = np.geomspace(flops.min() / 2, flops.max() * 2, 100)
    for color, params in enumerate(sorted({p.params for p in points})):
        own = [p for p in points if p.params == params]
        ax.plot([p.flops for p in own], [p.val_loss for p in own], "o", color=f"C{color}",
                label=f"{own[0].size}: N = {params:,}")
        own_span = np.geomspace(min(p.flops for p in own) / 2, max(p.flops for p in own) * 2, 50)
        ax.plot(own_span, fit.loss(params, own_span / (6 * params)), "-", color=f"C{color}", alpha=0.6)
    n_opt = np.array([fit.optimum(c)[0] for c in span])
    ax.plot(span, fit.loss(n_opt, span / (6 * n_opt)), "k--", label="compute-optimal frontier (fit)")
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="held-out loss (nats/token)",
           title="scaling grid and fitted L(N, D)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
