"""What a federation starts from: the plan, the initial model, the strategy
and the request every round sends with its weights."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.roster import Roster
from server.strategy import GroupedStrategy
from shared_model.backbone import Backbone, apply_backbone, load_backbone
from shared_model.errors import ConfigError
from shared_model.federation_config import STAGES, FederationConfig
from shared_model.messages import RoundRequest
from shared_model.model import build_model
from shared_model.model_config import ModelConfig, model_config_for
from shared_model.parameter_groups import parameter_groups, stage_parameter_groups
from shared_model.plan import Plan, plan_file

log = logging.getLogger(__name__)


def resolve_plan(fed: FederationConfig, backbone: Backbone | None = None) -> Plan:
    """``plan``, else the cohort's plan.json, else the pretrained backbone's
    plan, else the default; a backbone built for another plan is refused."""
    if (found := plan_file(fed.plan, fed.cohort_dir)) is not None:
        plan = Plan.load(found)
    elif backbone is not None:
        return backbone.plan
    else:
        plan = Plan()
    if backbone is not None and backbone.plan.to_dict() != plan.to_dict():
        raise ConfigError(
            f"run config `backbone` {backbone.path} was pretrained with plan "
            f"{backbone.plan.to_dict()}, the federation uses {plan.to_dict()}; "
            "pretrain on the federation's plan (`moefl pretrain --plan`)"
        )
    return plan


@dataclass
class FederationStart:
    """What a federation starts from: the initial model and the round config
    (a :class:`server.round_loop.RunStart`), and the strategy that runs it."""

    plan: Plan
    model_cfg: ModelConfig
    arrays: dict[str, np.ndarray]  # initial global weights
    strategy: GroupedStrategy  # aggregates each stage's groups, runs the rounds
    request: RoundRequest  # sent to every site with each round's weights
    backbone: dict[str, Any] | None = None  # the pretrained backbone's record


def start_federation(
    fed: FederationConfig, plan: Plan | None = None, *, roster: Roster | None = None
) -> FederationStart:
    """Seed, resolve the plan (unless the planning query gave ``plan``), build
    the initial model, strategy (with the run folder's ``roster``) and round
    config."""
    random.seed(fed.seed)
    np.random.seed(fed.seed)
    torch.manual_seed(fed.seed)
    backbone = load_backbone(Path(fed.backbone)) if fed.backbone else None
    plan = plan or resolve_plan(fed, backbone)
    model_cfg = model_config_for(fed, plan)
    if backbone is not None and backbone.feature_centre and fed.features == "tumour":
        model_cfg = dataclasses.replace(
            model_cfg,
            feature_centre=backbone.feature_centre,
            feature_scale=backbone.feature_scale,
        )
    model = build_model(model_cfg)
    request = RoundRequest(
        run_config=fed.to_run_config(),
        plan=plan.to_dict(),
        model_config=model_cfg.to_dict(),
        backbone_sha256=None if backbone is None else backbone.sha256,
    )
    if backbone is not None:
        apply_backbone(model, backbone)
        log.info(
            "pretrained backbone %s (sha256 %s, trained on %s); training the heads "
            "alone",
            backbone.path,
            backbone.sha256,
            backbone.trained_on.get("source", "?"),
        )
    stages = {stage: stage_parameter_groups(model, stage) for stage in STAGES}
    return FederationStart(
        plan,
        model_cfg,
        {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        GroupedStrategy(fed, parameter_groups(model), stages=stages, roster=roster),
        request,
        None
        if backbone is None
        else {
            "path": str(backbone.path),
            "sha256": backbone.sha256,
            "trained_on": backbone.trained_on,
        },
    )
