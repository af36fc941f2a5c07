"""Training engine: optimisation, freezing, schedule, evaluation maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from client.training.engine import (
    CasePrediction,
    TrainConfig,
    evaluate,
    summarise_predictions,
    train_local,
)
from client.training.local_steps import poly_lr
from shared_model.errors import ConfigError
from shared_model.model import build_model
from tests.unit.test_model import SMALL

CFG = SMALL  # the small network of the model tests


class Toy(torch.utils.data.Dataset):
    """Synthetic patients: a bright cube is the tumour; pCR follows its ADC."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = torch.randn(2, *CFG.patch_size, generator=g) * 0.1
            label = torch.zeros(1, *CFG.patch_size)
            label[:, 2:6, 8:20, 8:20] = 1
            pcr = float(i % 2)
            image[0][label[0] > 0] += 1.0
            image[1][label[0] > 0] += 0.5 + pcr
            clinical = torch.zeros(15)
            clinical[[1, 3, 6, 8, 10, 13]] = 1
            self.items.append(
                {
                    "image": image,
                    "label": label,
                    "clinical": clinical,
                    "regimen": torch.tensor(i % 2),
                    "pcr": torch.tensor(pcr),
                    "case_id": f"T{i}",
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_poly_schedule() -> None:
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError):
        TrainConfig(lr=0)


def test_training_reduces_the_loss_and_respects_frozen_groups() -> None:
    torch.manual_seed(0)
    model = build_model(CFG)
    data = Toy(8)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.startswith("experts.nCT.")
    }
    trainable = {
        n for n, _ in model.named_parameters() if not n.startswith("experts.nCT.")
    }
    first = train_local(
        model,
        data,
        TrainConfig(
            max_steps=2, batch_size=4, augment=False, optimizer="adamw", lr=3e-3
        ),
        device=torch.device("cpu"),
        trainable=trainable,
    )
    last = train_local(
        model,
        data,
        TrainConfig(
            max_steps=30, batch_size=4, augment=False, optimizer="adamw", lr=3e-3
        ),
        device=torch.device("cpu"),
        trainable=trainable,
    )
    assert last.loss < first.loss
    assert last.steps == 30 and last.n_by_regimen == {"nCRT": 4, "TNT": 4, "nCT": 0}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
        assert p.requires_grad  # restored after training
    result = evaluate(model, data, device=torch.device("cpu"))
    assert result.metrics["n"] == 8 and result.metrics["dice"] > 0.5
    assert len(result.cases) == 8 and all(len(c.probs) == 3 for c in result.cases)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 1), st.floats(0.01, 0.99)),
        min_size=4,
        max_size=40,
    )
)
def test_auc_summary_matches_sklearn(rows: list[tuple[int, int, float]]) -> None:
    cases = [
        CasePrediction(f"c{i}", r, float(y), [p, 1 - p, p / 2], None, 0.0)
        for i, (r, y, p) in enumerate(rows)
    ]
    summary = summarise_predictions(cases)
    y = np.array([c.pcr for c in cases])
    s = np.array([c.probs[c.regimen] for c in cases])
    if len(set(y)) == 2:
        assert summary["auc"] == pytest.approx(roc_auc_score(y, s))
    else:
        assert summary["auc"] is None
    for j, name in enumerate(("nCRT", "TNT", "nCT")):
        sel = np.array([c.regimen == j for c in cases])
        if sel.any() and len(set(y[sel])) == 2:
            assert summary["auc_by_regimen"][name] == pytest.approx(
                roc_auc_score(y[sel], np.array([c.probs[j] for c in cases])[sel])
            )
    assert summary["dice"] is None and not math.isnan(summary["loss"])
