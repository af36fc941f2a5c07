"""Benchmark: paired AUC differences between models on the same test patients.

A benchmark, not a test. Federated evaluation sends counts, which give each
model's AUC with its interval but not the interval of a difference between two
models scored on the same patients; here, in simulation, every model scores
every patient of the held-out test cohort in one place, and the difference in
AUC (received regimen) gets a paired bootstrap interval (patients resampled,
both models' AUCs from scikit-learn on each resample).

    python -m simulations.benchmarks.paired --cohort C --models A B [NAME=C ...] \
        --pairs A:B A:NAME --out runs/bench_paired
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from shared_model.layout import TEST, site_yamls
from simulations.benchmarks.common import benchmark_parser, finish


def scores_on_test(checkpoint: Path, cohort: Path) -> dict[str, tuple[int, float]]:
    """case id -> (pCR, predicted pCR under the received regimen) on the test
    cohort, scored as ``moefl evaluate`` scores (:mod:`client.scoring.inference`)."""
    import torch

    from client.data.dataset import SiteDataset
    from client.data.site_config import load_site_config
    from client.data.site_data import list_cases
    from client.scoring.inference import score_dataset
    from shared_model.checkpoint import load_checkpoint

    model, plan = load_checkpoint(checkpoint)
    out: dict[str, tuple[int, float]] = {}
    for yaml in site_yamls(cohort, TEST):
        config = load_site_config(yaml)
        cases = list_cases(config.dataset_dir, require_outcome=True)
        data = SiteDataset(
            cases, plan, adc_scale=config.adc_scale, train=False, whole=True
        )
        for c in score_dataset(model, data, plan, device=torch.device("cpu")):
            out[c.case_id] = (int(c.pcr), float(c.probs[c.regimen]))
    return out


def paired_difference(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """AUC(a) - AUC(b) on the same patients with a percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    n = len(y)
    while len(diffs) < n_boot:
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < 2:
            continue
        diffs.append(
            float(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
        )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {
        "auc_a": float(roc_auc_score(y, a)),
        "auc_b": float(roc_auc_score(y, b)),
        "difference": float(roc_auc_score(y, a) - roc_auc_score(y, b)),
        "ci": (float(lo), float(hi)),
        "n": int(n),
    }


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "paired", "unused")
    parser.add_argument(
        "--models", nargs="+", required=True, help="checkpoint folders, or NAME=FOLDER"
    )
    parser.add_argument("--pairs", nargs="+", required=True, help="A:B folder names")
    args = parser.parse_args(argv)
    if args.cohort is None:
        parser.error("--cohort is required")
    named = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.models]
    preds = {name: scores_on_test(Path(folder), args.cohort) for name, folder in named}
    rows = []
    lines = [
        "| model | against | test patients | AUC | AUC against | difference (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for pair in args.pairs:
        a, b = pair.split(":")
        ids = sorted(set(preds[a]) & set(preds[b]))
        y = np.array([preds[a][i][0] for i in ids])
        res = paired_difference(
            y,
            np.array([preds[a][i][1] for i in ids]),
            np.array([preds[b][i][1] for i in ids]),
        )
        rows.append({"a": a, "b": b, **res})
        lines.append(
            f"| {a} | {b} | {res['n']} | {res['auc_a']:.3f} | {res['auc_b']:.3f} | "
            f"{res['difference']:+.3f} ({res['ci'][0]:+.3f} to {res['ci'][1]:+.3f}) |"
        )
    finish(args, "paired", "\n".join(lines), rows)


if __name__ == "__main__":
    main()
