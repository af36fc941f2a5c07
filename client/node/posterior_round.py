"""A site's part of the federated Newton fit of the linear head (no Flower).

:func:`newton_round` answers one Newton query: for each candidate prior's
current coefficients, the sums of the site's training patients' negative
log-likelihood gradient and Hessian (:func:`shared_model.posterior.glm_sums`)
and the same sums over its validation patients (which choose the prior and
recalibrate the head), over the tumour features it cached with the frozen
backbone; plus the sums and sums of squares of those
features (the pooled standardisation). Only sums leave the site, the same kind
of aggregate its evaluation already sends; they are exact, not noised, so a
site with a ``privacy`` section refuses the query (its heads train by DP-SGD
rounds instead, and advice uses the margin rule), and so does a site whose YAML
sets ``secure_aggregation: required`` (the sums are not securely aggregated).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from client.node.site_state import RoundSetup, prepare_round
from client.training.feature_cache import FeatureSet, eval_view, load_or_build
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError, SecureAggregationRequired
from shared_model.layout import FEATURE_CACHE
from shared_model.messages import RoundRequest
from shared_model.newton_messages import NewtonReply
from shared_model.posterior import GlmSums, glm_sums

log = logging.getLogger(__name__)


def newton_round(
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    beta: np.ndarray,
    node_config: Mapping[str, Any],
) -> NewtonReply:
    """The site's sums at each candidate's coefficients ``beta`` ``(K, 4, P)``."""
    r = prepare_round(request, arrays, node_config)
    name = r.site.config.site_name
    if r.site.config.secure_aggregation.required:
        raise SecureAggregationRequired(
            f"site {name} requires secure aggregation: the Newton fit's per-site "
            "sums would leave in the clear (use head-fit rounds)"
        )
    if r.site.config.privacy is not None:
        raise ConfigError(
            f"site {name} has a `privacy` section: it does not release exact "
            "gradient and Hessian sums (run its federation with head-fit=rounds)"
        )
    if not r.model.is_glm:
        raise ConfigError("the Newton fit needs head-type linear with residual experts")
    train, val = _features(r, "train"), _features(r, "val")
    z_train, z_val = _design(r, train), _design(r, val)
    sums: list[GlmSums] = [
        glm_sums(z_train, train.regimen.numpy(), train.pcr.numpy(), b) for b in beta
    ]
    val_sums = [glm_sums(z_val, val.regimen.numpy(), val.pcr.numpy(), b) for b in beta]
    raw = train.features.double().numpy()
    known = ~np.isnan(val.pcr.numpy())
    log.info(
        "site %s: Newton sums for %d candidates over %d patients",
        name,
        len(beta),
        sums[0].n,
    )
    return NewtonReply(
        name,
        sums[0].n,
        np.array([s.loglik for s in sums]),
        np.stack([s.grad for s in sums]),
        np.stack([s.hess for s in sums]),
        int(known.sum()),
        np.array([v.loglik for v in val_sums], np.float64),
        len(raw),
        raw.sum(axis=0),
        (raw * raw).sum(axis=0),
        {
            r: int(((train.regimen.numpy() == j) & ~np.isnan(train.pcr.numpy())).sum())
            for j, r in enumerate(REGIMENS)
        },
        np.stack([v.grad for v in val_sums]),
        np.stack([v.hess for v in val_sums]),
    )


def _features(r: RoundSetup, split: str) -> FeatureSet:
    """The split's cached tumour features under the received backbone."""
    site = r.site
    data = site.train if split == "train" else site.val
    features, _ = load_or_build(
        site.config.run_dir / FEATURE_CACHE,
        split,
        r.model,
        site.plan,
        eval_view(data, site.plan, site.config.adc_scale),
        device=r.device,
    )
    return features


def _design(r: RoundSetup, data: FeatureSet) -> np.ndarray:
    """The linear head's input ``z`` ``(n, E)`` for cached features."""
    with torch.no_grad():
        return r.model.cpu().head_input(data.features, data.clinical).double().numpy()
