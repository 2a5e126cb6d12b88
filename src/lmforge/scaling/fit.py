"""The fit of L(N, D) = E + A / N^alpha + B / D^beta to a grid of runs, and its compute-optimal N and D.

Hoffmann et al. 2022's "approach 3": in log space, log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a,
B = e^b, E = e^e, fitted from a grid of starting points, the best refined under a Huber loss (robust to one bad run).
For a FLOP budget C = 6 N D the loss is lowest at N_opt = G (C/6)^(beta / (alpha + beta)),
D_opt = (1 / G) (C/6)^(alpha / (alpha + beta)), where G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

from lmforge.errors import ConfigError

N_PARAMS = 5  # E, A, B, alpha, beta
MIN_POINTS = N_PARAMS + 1  # one degree of freedom left over, so the residual says something
MIN_DISTINCT = 2  # distinct model sizes and distinct token budgets each: alpha needs two N, beta two D
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: 70B parameters on 1.4T tokens
HUBER_DELTA = 1e-3  # in log loss, as Hoffmann et al.
EXPONENT_BOUNDS = (0.01, 2.0)


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    # standard errors of (log E, log A, log B, alpha, beta) from the Jacobian at the optimum; None where not identified:
    # a parameter pinned at one of its bounds (the others' errors are then conditional on it), or a singular Jacobian
    stderr: dict[str, float | None]
    rms_log_residual: float
    points: int

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimum(self, flops: float) -> tuple[float, float]:
        """The compute-optimal (N, D) for a budget of `flops` = 6 N D, in closed form."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (6 * n)

    def as_dict(self) -> dict:
        return asdict(self)


def check_grid(n: np.ndarray, d: np.ndarray) -> None:
    """Refuse a grid the five-parameter fit cannot identify, saying what it needs."""
    sizes, budgets = len(set(n.tolist())), len(set(d.tolist()))
    if len(n) < MIN_POINTS or sizes < MIN_DISTINCT or budgets < MIN_DISTINCT:
        raise ConfigError(f"the fit of L(N, D) = E + A/N^alpha + B/D^beta has {N_PARAMS} parameters and needs at "
                          f"least {MIN_POINTS} trained grid points with at least {MIN_DISTINCT} distinct model sizes "
                          f"and {MIN_DISTINCT} distinct token budgets; got {len(n)} points, {sizes} sizes, {budgets} "
                          "budgets: add sizes to --sizes or budgets to --tokens (e.g. 3 x 3)")


def _log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L at every point, and its Jacobian [points, 5] (the softmax weights of the three terms)."""
    log_e, log_a, log_b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, log_e), log_a - alpha * log_n, log_b - beta * log_d])
    top = terms.max(axis=0)
    exp = np.exp(terms - top)
    total = exp.sum(axis=0)
    w_e, w_a, w_b = exp / total
    return top + np.log(total), np.stack([w_e, w_a, w_b, -w_a * log_n, -w_b * log_d], axis=1)


def fit_scaling_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> ScalingFit:
    """Fit L(N, D) to losses of runs with N (non-embedding) parameters on D tokens, from several starts."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    check_grid(n, d)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)

    def residuals(theta: np.ndarray) -> np.ndarray:
        return _log_loss(theta, log_n, log_d)[0] - log_l

    def jacobian(theta: np.ndarray) -> np.ndarray:
        return _log_loss(theta, log_n, log_d)[1]

    # E lies below every observed loss; A and B anywhere a reasonable power law puts them
    lower = [-10.0, -10.0, -10.0, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]]
    upper = [math.log(loss.min()), 30.0, 30.0, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]]
    best = None
    for e_frac, log_a, log_b, alpha, beta in itertools.product((0.2, 0.8), (0.0, 5.0, 10.0), (0.0, 5.0, 10.0),
                                                               (0.3, 0.7), (0.3, 0.7)):
        start = np.array([upper[0] + math.log(e_frac), log_a, log_b, alpha, beta])  # E a fraction of the lowest loss
        result = least_squares(residuals, np.clip(start, lower, upper), jac=jacobian, bounds=(lower, upper))
        if best is None or result.cost < best.cost:
            best = result
    # the starts run plain least squares (ten times cheaper); the best one is refined under the Huber loss
    best = least_squares(residuals, best.x, jac=jacobian, bounds=(lower, upper), loss="huber", f_scale=HUBER_DELTA)
    theta = best.x
    resid = residuals(theta)
    names = ("log_E", "log_A", "log_B", "alpha", "beta")
    dof = len(loss) - N_PARAMS
    free = best.active_mask == 0
    stderr: dict[str, float | None] = dict.fromkeys(names)
    jtj = best.jac[:, free].T @ best.jac[:, free]
    if np.linalg.matrix_rank(jtj) == int(free.sum()):
        variances = np.diag(np.linalg.inv(jtj)) * float(resid @ resid) / dof
        free_names = [name for name, is_free in zip(names, free, strict=True) if is_free]
        stderr.update({name: float(math.sqrt(max(v, 0.0))) for name, v in zip(free_names, variances, strict=True)})
    log_e, log_a, log_b, alpha, beta = (float(x) for x in theta)
    return ScalingFit(math.exp(log_e), math.exp(log_a), math.exp(log_b), alpha, beta, stderr,
                      float(np.sqrt(np.mean(resid**2))), len(loss))
