"""fastted.train.stats: Student-t quantiles against the tables, intervals over seeds, the paired bootstrap over test
examples against its definition and against the normal approximation of a paired difference."""

import math

import numpy as np
import pytest

from fastted.train.stats import mean_interval, paired_bootstrap, t_cdf, t_quantile

# Two-sided 95 % critical values of Student's t (the 0.975 quantile), from the standard tables.
T_975 = {
    1: 12.706204736174707,
    2: 4.302652729911275,
    3: 3.182446305284263,
    4: 2.7764451051977987,
    9: 2.2621571627409915,
    30: 2.0422724563012373,
    200: 1.9718962236339088,
}


@pytest.mark.parametrize("df", list(T_975))
def test_t_quantiles_are_the_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], rel=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-T_975[df], rel=1e-9)
    assert t_cdf(0.0, df) == pytest.approx(0.5, abs=1e-15)


def test_t_cdf_tends_to_the_normal():
    for x in (-2.0, -0.5, 0.3, 1.96):
        normal = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        assert t_cdf(x, 2000) == pytest.approx(normal, abs=2e-4)


def test_mean_interval_over_seeds():
    got = mean_interval([0.9753, 0.9708, 0.9798])
    values = np.array([0.9753, 0.9708, 0.9798])
    half = T_975[2] * values.std(ddof=1) / math.sqrt(3)
    assert got["mean"] == pytest.approx(values.mean()) and got["std"] == pytest.approx(values.std(ddof=1))
    assert (got["low"], got["high"]) == pytest.approx((values.mean() - half, values.mean() + half))
    assert mean_interval([0.5]) == {"mean": 0.5, "std": 0.0, "low": 0.5, "high": 0.5, "n": 1}


def test_paired_bootstrap_against_the_normal_approximation():
    """On 2,000 examples where model a is right 3 points more often than b (paired, correlated), the bootstrap
    interval of a - b matches mean +- 1.96 standard errors of the per-example differences."""
    rng = np.random.default_rng(7)
    b = (rng.random((3, 2000)) < 0.80).astype(float)
    flip = rng.random((3, 2000)) < 0.15  # a differs from b on 15 % of the examples, mostly for the better
    a = np.where(flip, (rng.random((3, 2000)) < 0.6).astype(float), b)
    got = paired_bootstrap(a, b, resamples=20000, seed=1)
    per_example = (a - b).mean(0)
    se = per_example.std(ddof=1) / math.sqrt(per_example.size)
    assert got["diff"] == pytest.approx(per_example.mean())
    assert got["low"] == pytest.approx(per_example.mean() - 1.96 * se, abs=0.15 * se + 1e-3)
    assert got["high"] == pytest.approx(per_example.mean() + 1.96 * se, abs=0.15 * se + 1e-3)
    same = paired_bootstrap(b, b)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_le_0": 1.0}


@pytest.mark.bad_input
def test_bad_input():
    with pytest.raises(ValueError, match="same seeds and test examples"):
        paired_bootstrap(np.ones((2, 5)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-empty list of finite numbers"):
        mean_interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="df must be a positive int"):
        t_quantile(0.9, 0)
