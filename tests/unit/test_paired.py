"""The paired AUC difference used by the paired benchmark."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from simulations.benchmarks.paired import paired_difference


def test_paired_difference_is_zero_for_one_model_and_positive_for_a_better_one() -> (
    None
):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    signal = y + rng.normal(0, 1.0, 300)
    same = paired_difference(y, signal, signal, n_boot=200)
    assert same["difference"] == 0 and same["ci"] == (0.0, 0.0)
    noisy = signal + rng.normal(0, 2.0, 300)
    res = paired_difference(y, signal, noisy, n_boot=500)
    assert res["auc_a"] == roc_auc_score(y, signal)
    assert res["difference"] == res["auc_a"] - res["auc_b"] > 0
    assert res["ci"][0] > 0 and res["ci"][0] < res["difference"] < res["ci"][1]
