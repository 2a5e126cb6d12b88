"""Noise on evaluation numbers: Wilson intervals and the paired tests, against values worked out by hand."""

from __future__ import annotations

import pytest

from lmforge.eval.stats import mcnemar_exact, paired_bootstrap, wilson_interval


def test_wilson_interval_known_values():
    # 0/10: upper = z^2/n / (1 + z^2/n) = 0.38415/1.38415; 5/10: 0.5 +- z/(1+z^2/n) * sqrt(0.025 + z^2/400)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(60, 300) == pytest.approx((0.15866, 0.24893), abs=1e-5)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_mcnemar_exact_by_hand():
    """9 items only b gets right, 1 only a: p = 2 * P(Bin(10, 1/2) <= 1) = 2 * 11/1024."""
    a = [True] * 20 + [False] * 9 + [True] + [False] * 5
    b = [True] * 20 + [True] * 9 + [False] + [False] * 5
    test = mcnemar_exact(a, b)
    assert test.detail == {"only_a": 1, "only_b": 9}
    assert test.p_value == pytest.approx(22 / 1024)
    assert test.difference == pytest.approx(8 / 35) and test.significant()
    # 6 against 4: p = 2 * P(Bin(10, 1/2) <= 4) = 2 * 386/1024 > 0.05: within noise
    even = mcnemar_exact([True] * 6 + [False] * 4, [False] * 6 + [True] * 4)
    assert even.p_value == pytest.approx(772 / 1024) and not even.significant()
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0  # no discordant items


def test_paired_bootstrap_tells_a_shift_from_noise():
    base = [0.1 * (i % 7) for i in range(200)]
    shifted = paired_bootstrap(base, [x + 0.05 + 0.01 * (i % 3 - 1) for i, x in enumerate(base)], resamples=2000)
    assert shifted.difference == pytest.approx(0.05, abs=1e-3) and shifted.significant()
    low, high = shifted.detail["ci95"]
    assert low < 0.05 < high
    noise = paired_bootstrap(base, [x + (0.1 if i % 2 else -0.1) for i, x in enumerate(base)], resamples=2000)
    assert abs(noise.difference) < 1e-12 and not noise.significant()
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
