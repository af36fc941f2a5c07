"""A pretrained backbone artifact: the segmenter alone, with what it was trained on.

``moefl pretrain`` trains the segmentation backbone on a public cohort and
writes one safetensors file: the backbone's tensors (``backbone.*``) and, in
its metadata, the format, the SHA-256 of the weights
(:func:`backbone_digest`), the plan and model config it was built for and a
``trained_on`` record (source, cases, seed). A federation given such a file
(run config ``backbone``) freezes it and trains the heads alone over features
it computes; DP sites join only such a federation, and may pin the digests they
accept (site YAML ``privacy.public_backbones``).

Reading is strict: a file whose stored digest does not match its weights, whose
tensors are not finite, or whose shapes do not fit the federation's network is
refused with the file named.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from shared_model.errors import ConfigError, DataError
from shared_model.model import UNetMoECli
from shared_model.parameter_groups import is_head_parameter
from shared_model.plan import Plan

FORMAT = "moefl-backbone-1"


def backbone_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of the segmenter's weights in ``state`` (names, shapes, float32
    bytes; the head's entries are ignored). Takes a model's ``state_dict()``
    or the global arrays as numpy."""
    h = hashlib.sha256()
    for name in sorted(state):
        if is_head_parameter(name):
            continue
        value = state[name]
        array = (
            value.detach().cpu().contiguous().numpy()
            if isinstance(value, torch.Tensor)
            else np.ascontiguousarray(value)
        )
        h.update(name.encode())
        h.update(str(tuple(array.shape)).encode())
        h.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Backbone:
    """A pretrained backbone read from its artifact."""

    path: Path
    state: dict[str, torch.Tensor]
    sha256: str
    plan: Plan
    model_config: dict[str, Any]
    trained_on: dict[str, Any]
    feature_centre: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()


def save_backbone(
    model: UNetMoECli,
    path: Path,
    *,
    plan: Plan,
    trained_on: Mapping[str, Any],
    feature_stats: tuple[list[float], list[float]] | None = None,
) -> str:
    """Write ``model``'s backbone to ``path`` (atomically); returns its SHA-256.

    ``feature_stats``: the tumour features' mean and standard deviation over
    the public training cases, which federations over this backbone use to
    standardise the features (:class:`shared_model.model.ModelConfig`)."""
    state = {
        name: t.detach().cpu().contiguous()
        for name, t in model.state_dict().items()
        if not is_head_parameter(name)
    }
    digest = backbone_digest(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(
        state,
        str(tmp),
        metadata={
            "format": FORMAT,
            "sha256": digest,
            "plan": json.dumps(plan.to_dict(), sort_keys=True),
            "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
            "trained_on": json.dumps(dict(trained_on), sort_keys=True),
            "feature_stats": json.dumps(
                None
                if feature_stats is None
                else {"centre": feature_stats[0], "scale": feature_stats[1]}
            ),
        },
    )
    os.replace(tmp, path)
    return digest


def load_backbone(path: Path) -> Backbone:
    """Read and verify a backbone artifact (raises :class:`DataError`)."""
    path = Path(path)
    hint = "write it again with `moefl pretrain`"
    if not path.is_file():
        raise DataError(f"{path}: no such backbone file; {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); {hint}") from e
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: not a moefl backbone (format {meta.get('format')!r}, expected "
            f"{FORMAT!r}); {hint}"
        )
    if not state or any(is_head_parameter(n) for n in state):
        raise DataError(f"{path}: holds tensors other than the backbone's; {hint}")
    if not all(
        torch.isfinite(t).all() for t in state.values() if t.is_floating_point()
    ):
        raise DataError(f"{path}: the weights hold NaN or infinite values; {hint}")
    digest = backbone_digest(state)
    if digest != meta.get("sha256"):
        raise DataError(
            f"{path}: the weights do not match the SHA-256 stored with them (the "
            f"file is damaged or was altered); {hint}"
        )
    try:
        plan = Plan.from_dict(json.loads(meta["plan"]))
        model_config = json.loads(meta["model_config"])
        trained_on = json.loads(meta.get("trained_on", "{}"))
        stats = json.loads(meta.get("feature_stats", "null")) or {}
        centre = tuple(float(x) for x in stats.get("centre", ()))
        scale = tuple(float(x) for x in stats.get("scale", ()))
        if len(centre) != len(scale) or not all(
            math.isfinite(c) and math.isfinite(v) and v > 0
            for c, v in zip(centre, scale, strict=True)
        ):
            raise ValueError("feature statistics are not finite positive scales")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: its metadata is malformed ({e}); {hint}") from e
    return Backbone(path, state, digest, plan, model_config, trained_on, centre, scale)


def apply_backbone(model: UNetMoECli, backbone: Backbone) -> None:
    """Load ``backbone`` into ``model`` (raises :class:`ConfigError` when the
    network does not fit: other filters, plan or kernels)."""
    own = {n: t for n, t in model.state_dict().items() if not is_head_parameter(n)}
    missing = sorted(set(own) - set(backbone.state))
    extra = sorted(set(backbone.state) - set(own))
    wrong = sorted(
        n
        for n in set(own) & set(backbone.state)
        if own[n].shape != backbone.state[n].shape
    )
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise ConfigError(
            f"{backbone.path}: the backbone does not fit this federation's network "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} "
            f"differently shaped tensors, e.g. {first}); pretrain it with the "
            "federation's plan and `base-filters`/`max-filters`"
        )
    model.load_state_dict(backbone.state, strict=False)
