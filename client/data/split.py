"""A site's train/validation split: stratified by (regimen, pCR), computed
once and kept in ``run_dir/split.json`` so validation cases never leak into
training across restarts."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.data.site_config import SiteConfig
from client.data.site_data import CaseFiles
from shared_model.errors import DataError


@dataclass(frozen=True)
class Split:
    """A site's train/validation split; it stays on the site's disk."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    seed: int
    val_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "train": list(self.train),
            "val": list(self.val),
        }


def compute_split(
    cases: Sequence[CaseFiles], *, val_fraction: float, seed: int
) -> Split:
    """Stratified split by (regimen, pCR), exact to within one case per stratum.

    Each stratum is shuffled with the seed, the strata are laid end to end and
    every ``1 / val_fraction``-th position (with a random phase) goes to
    validation, so each stratum keeps its share and the total is
    ``round(N * val_fraction)`` give or take one.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple[str, int], list[str]] = defaultdict(list)
    for c in sorted(cases, key=lambda c: c.case_id):
        strata[
            (c.clinical.regimen, -1 if c.clinical.pcr is None else c.clinical.pcr)
        ].append(c.case_id)
    ordered: list[str] = []
    for key in sorted(strata):
        ids = strata[key]
        ordered.extend(ids[i] for i in rng.permutation(len(ids)))
    phase = float(rng.random())
    val = [
        cid
        for i, cid in enumerate(ordered)
        if math.floor((i + 1) * val_fraction + phase)
        > math.floor(i * val_fraction + phase)
    ]
    val_set = set(val)
    train = tuple(sorted(c for c in ordered if c not in val_set))
    return Split(
        train=train, val=tuple(sorted(val_set)), seed=seed, val_fraction=val_fraction
    )


def load_or_make_split(config: SiteConfig, cases: Sequence[CaseFiles]) -> Split:
    """Reuse ``run_dir/split.json`` when it matches the site's cases, else write it.

    A split is kept across restarts so validation cases never leak into
    training. If the site's cases changed since, the old split is an error
    rather than silently replaced.
    """
    path = config.run_dir / "split.json"
    ids = {c.case_id for c in cases}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            split = Split(
                tuple(data["train"]),
                tuple(data["val"]),
                int(data["seed"]),
                float(data["val_fraction"]),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read the saved split ({e}); delete it to re-split"
            ) from e
        if set(split.train) | set(split.val) != ids:
            raise DataError(
                f"{path}: the site's cases changed since this split was written; delete "
                "the file to re-split (validation results before and after are then not "
                "comparable)"
            )
        return split
    split = compute_split(
        cases, val_fraction=config.val_fraction, seed=config.split_seed
    )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=1) + "\n")
    return split
