"""Statistics for comparing distillation methods over seeds and test examples, without scipy.

- :func:`mean_interval`: the mean of a metric over seeds with its standard deviation and a Student-t
  confidence interval (the t quantile from the exact t distribution of integer degrees of freedom);
- :func:`paired_bootstrap`: the difference of two models' accuracies on the same test examples (and the same
  seeds), with a percentile interval from resampling the test examples: what separates a method's gain from
  the noise of a test split of a few hundred examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` (a positive int) degrees of freedom, in closed form."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive int, got {df!r}")
    theta = math.atan(x / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + ...))
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = 2.0 / math.pi * (theta + s * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(2, df, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = s * total
    return 0.5 * (1.0 + a)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """``mean``, ``std`` (n - 1) and the Student-t ``low`` and ``high`` of the mean of ``values`` (one per seed),
    and ``n``; with one value the interval is that value (no spread can be told)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"values must be a non-empty list of finite numbers, got {list(values)!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "std": 0.0, "low": mean, "high": mean, "n": 1}
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, int(x.size) - 1) * std / math.sqrt(x.size)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": int(x.size)}


def paired_bootstrap(a, b, resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The difference of mean accuracy, a - b, of two models on the same test examples, with a percentile
    interval from ``resamples`` resamplings of the examples (the same draw for both: the pairing).

    a, b: (seeds, examples) or (examples,) per-example correctness (0/1, or any per-example score), the same
    seeds and examples in the same order. Returns ``diff``, ``low``, ``high`` (accuracy units) and ``p_le_0``,
    the share of resamples in which a does not beat b.
    """
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (a, b))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must hold the same seeds and test examples, got shapes {a.shape} and {b.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    per_example = (a - b).mean(0)  # the difference of each example, averaged over the seeds
    rng = np.random.default_rng(seed)
    n = per_example.size
    draws = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: (1000, n) indices
        count = min(1000, resamples - start)
        draws[start : start + count] = per_example[rng.integers(0, n, (count, n))].mean(1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return {
        "diff": float(per_example.mean()),
        "low": float(low),
        "high": float(high),
        "p_le_0": float((draws <= 0).mean()),
    }
