"""The site's feature cache: per-patient tumour features from a frozen backbone.

Staged training computes each patient's tumour features
(:meth:`shared_model.model.UNetMoECli.tumour_features`, on the tumour-centred
crop that evaluation also uses) once per backbone and trains the pCR heads over
them for many epochs. The features are patient data: the cache lives under the
site's ``run_dir/feature_cache/`` and is never sent.

A cache file is a safetensors file whose metadata holds its key: a SHA-256 of
the backbone's weights, the model config, the plan, the feature version, and,
per case, its id, clinical record and the size and modification time of its
files. A changed backbone, plan or case gives another key and so a rebuild; a
file whose stored key, shapes or values do not check out is rebuilt with a
warning, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from client.data.dataset import SiteDataset
from client.data.site_data import CaseFiles
from shared_model.backbone import backbone_digest
from shared_model.model import UNetMoECli
from shared_model.plan import Plan

log = logging.getLogger(__name__)

FEATURE_VERSION = 1
"""Bumped whenever :mod:`shared_model.features` changes what it computes."""


@dataclass
class FeatureSet:
    """Cached inputs of the pCR heads, one row per patient."""

    case_ids: list[str]
    features: torch.Tensor  # (N, F) float32
    clinical: torch.Tensor  # (N, 15) float32
    regimen: torch.Tensor  # (N,) int64
    pcr: torch.Tensor  # (N,) float32, NaN when unknown

    def __len__(self) -> int:
        return len(self.case_ids)

    @classmethod
    def concat(cls, parts: Sequence[FeatureSet]) -> FeatureSet:
        """Several sites' (or splits') feature sets as one."""
        return cls(
            [i for p in parts for i in p.case_ids],
            torch.cat([p.features for p in parts]),
            torch.cat([p.clinical for p in parts]),
            torch.cat([p.regimen for p in parts]),
            torch.cat([p.pcr for p in parts]),
        )


def cache_key(model: UNetMoECli, plan: Plan, cases: Sequence[CaseFiles]) -> str:
    """What the cached features depend on, hashed (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"moefl-features-{FEATURE_VERSION}".encode())
    h.update(backbone_digest(model.state_dict()).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(plan.to_dict(), sort_keys=True).encode())
    for case in cases:
        stats = case.file_stats()
        record = case.clinical
        h.update(
            json.dumps(
                [case.case_id, stats, record.features, record.regimen, record.pcr],
                sort_keys=True,
                default=str,
            ).encode()
        )
    return h.hexdigest()


@torch.no_grad()
def compute_features(
    model: UNetMoECli,
    dataset: SiteDataset,
    *,
    device: torch.device,
    batch_size: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Run the backbone in eval mode on every patient's tumour-centred crop."""
    model.to(device).eval()
    rows, ids, clinical, regimen, pcr = [], [], [], [], []
    n = len(dataset)
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, n))]
        image = torch.stack([s["image"] for s in samples]).to(device)
        rows.append(model.tumour_features(image).cpu())
        for s in samples:
            ids.append(s["case_id"])
            clinical.append(s["clinical"])
            regimen.append(s["regimen"])
            pcr.append(s["pcr"])
        if progress is not None:
            progress(min(start + batch_size, n), n)
    width = model.n_features
    return FeatureSet(
        ids,
        torch.cat(rows) if rows else torch.zeros(0, width),
        torch.stack(clinical).float() if clinical else torch.zeros(0, 15),
        torch.stack(regimen) if regimen else torch.zeros(0, dtype=torch.long),
        torch.stack(pcr).float() if pcr else torch.zeros(0),
    )


def _read(path: Path, key: str, model: UNetMoECli) -> FeatureSet:
    """A cache file, checked against its key; raises ValueError when it fails."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        raise ValueError("its key does not match")
    tensors = load_file(str(path))
    ids = json.loads(meta.get("case_ids", "null"))
    n = len(ids) if isinstance(ids, list) else -1
    features = tensors["features"]
    if (
        features.shape != (n, model.n_features)
        or tensors["clinical"].shape != (n, 15)
        or tensors["regimen"].shape != (n,)
        or tensors["pcr"].shape != (n,)
        or not torch.isfinite(features).all()
    ):
        raise ValueError("its shapes or values are wrong")
    return FeatureSet(
        ids, features, tensors["clinical"], tensors["regimen"], tensors["pcr"]
    )


def load_or_build(
    folder: Path,
    name: str,
    model: UNetMoECli,
    plan: Plan,
    dataset: SiteDataset,
    *,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[FeatureSet, bool]:
    """The cached features of ``dataset`` (its cases, this backbone and plan),
    built when missing, stale or corrupt.

    Returns:
        The features and whether they were read from the cache.
    """
    key = cache_key(model, plan, dataset.cases)
    path = Path(folder) / f"{name}-{key[:32]}.safetensors"
    if path.is_file():
        try:
            return _read(path, key, model), True
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.warning("feature cache %s is unusable (%s); rebuilding it", path, e)
            path.unlink(missing_ok=True)
    features = compute_features(model, dataset, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{name}-*.safetensors"):
        stale.unlink(missing_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(
        {
            "features": features.features.contiguous(),
            "clinical": features.clinical.contiguous(),
            "regimen": features.regimen.contiguous(),
            "pcr": features.pcr.contiguous(),
        },
        str(tmp),
        metadata={"key": key, "case_ids": json.dumps(features.case_ids)},
    )
    os.replace(tmp, path)
    return features, False


def eval_view(train: SiteDataset, plan: Plan, adc_scale: float) -> SiteDataset:
    """The training patients on tumour-centred crops without augmentation (what
    evaluation sees), sharing ``train``'s in-memory volume cache."""
    view = SiteDataset(train.cases, plan, adc_scale=adc_scale, train=False)
    view.cache = train.cache
    view._cache = train._cache
    return view
