"""Paired bootstrap over test items and training seeds.

Every measurement is an array of per-item values, one row per seed (``[n_seeds, n_items]``); all arrays
of one statistic share the test items, and arrays with the same number of seeds share the seeds (the
vanilla and Trans-PEFT adapters of seed k start from the same LoRA initialisation and see the same data
order). One bootstrap draw resamples the items once, and the seeds once, for all arrays together, so
paired differences and ratios keep their pairing. An array with one seed (the re-tuned adapter) has only
its items resampled.

The draws are weights (multinomial counts), so a draw's mean of an array is ``ws @ X @ wi / (ns * ni)``:
no copies of the data, a few milliseconds for thousands of draws.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate (the statistic of the plain means) and its percentile interval."""

    mean: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def bootstrap(arrays: dict[str, np.ndarray], statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
              draws: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """``statistic`` (a function of the per-array means, vectorised over draws) with a ``level`` percentile
    interval from ``draws`` paired resamples of items and seeds. Draws where the statistic is undefined
    (a ratio over zero) are left out; with more than half of them undefined, the interval is None."""
    arrays = {k: np.atleast_2d(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}
    n_items = {a.shape[1] for a in arrays.values()}
    if len(n_items) != 1:
        raise ValueError(f"paired arrays need the same items; got item counts {sorted(n_items)}")
    ni = n_items.pop()
    if ni == 0:
        raise ValueError("no items to resample")
    rng = np.random.default_rng(seed)
    wi = rng.multinomial(ni, np.full(ni, 1.0 / ni), size=draws).astype(np.float64)
    seed_weights = {}
    for ns in sorted({a.shape[0] for a in arrays.values()}):
        seed_weights[ns] = (np.ones((draws, 1)) if ns == 1 else
                            rng.multinomial(ns, np.full(ns, 1.0 / ns), size=draws).astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.asarray(statistic({k: np.array([a.mean()]) for k, a in arrays.items()}), dtype=np.float64)
        resampled = {k: np.einsum("bs,si,bi->b", seed_weights[a.shape[0]], a, wi) / (a.shape[0] * ni)
                     for k, a in arrays.items()}
        values = np.asarray(statistic(resampled), dtype=np.float64)
    mean = _finite(point.reshape(-1)[0])
    ok = values[np.isfinite(values)]
    if ok.size * 2 < draws:
        return Estimate(mean, None, None)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ok, [tail, 100 - tail])
    return Estimate(mean, _finite(low), _finite(high))


def mean_ci(x, draws: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``x`` ([n_seeds, n_items] or [n_items]) with its paired-bootstrap interval."""
    return bootstrap({"x": x}, lambda m: m["x"], draws, seed)


def ratio_ci(numerator, denominator, draws: int = 2000, seed: int = 0) -> Estimate:
    """mean(numerator) / mean(denominator), paired (e.g. retention: new-base / old-base accuracy)."""
    return bootstrap({"n": numerator, "d": denominator}, lambda m: m["n"] / m["d"], draws, seed)


def gap_closed_ci(method_new, vanilla_new, retuned_new, draws: int = 2000, seed: int = 0) -> Estimate:
    """(method - vanilla) / (retuned - vanilla) on the new base: the share of the transfer gap closed."""
    return bootstrap({"m": method_new, "v": vanilla_new, "r": retuned_new},
                     lambda m: (m["m"] - m["v"]) / (m["r"] - m["v"]), draws, seed)


def retention_difference_ci(method_new, method_old, vanilla_new, vanilla_old, draws: int = 2000,
                            seed: int = 0) -> Estimate:
    """method_new/method_old - vanilla_new/vanilla_old: how much more of its accuracy the method kept than
    vanilla (paired over items and seeds)."""
    return bootstrap({"mn": method_new, "mo": method_old, "vn": vanilla_new, "vo": vanilla_old},
                     lambda m: m["mn"] / m["mo"] - m["vn"] / m["vo"], draws, seed)
