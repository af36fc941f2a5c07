"""A site's data and the round's model, prepared from the coordinator's request.

The site YAML path arrives as node config ``site-config`` (deployment). In
simulation, node config ``partition-id`` selects one of the synthetic cohort's
site YAMLs (sorted by name) under run config ``cohort-dir``. A site's datasets
are loaded once per (site YAML, plan) and kept for the life of the process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.checks.fingerprint import check_plan_usable
from client.data.dataset import SiteDataset, build_site_datasets
from client.data.site_config import SiteConfig, load_site_config
from client.privacy.rounds import check_delta
from client.training.engine import resolve_device
from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.federation_config import FederationConfig
from shared_model.layout import PREPROCESSED, SITE_CONFIGS
from shared_model.messages import SHARED, RoundRequest, expert_group
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.plan import Plan


@dataclass
class SiteState:
    """A site's loaded data, kept for the life of the process (across rounds)."""

    config: SiteConfig
    plan: Plan
    train: SiteDataset
    val: SiteDataset
    counts: dict[str, int]


@dataclass
class RoundSetup:
    """What one round works with: the federation's settings, the site, the
    model holding the global weights, and the device to train on."""

    fed: FederationConfig
    site: SiteState
    model: UNetMoECli
    device: torch.device
    request: RoundRequest
    simulated: bool  # a simulated node (node config `partition-id`)


_SITES: dict[tuple[str, str], SiteState] = {}


def simulation_site_yamls(fed: FederationConfig) -> tuple[Path, list[Path]]:
    """The folder of a simulation's site YAMLs and the YAMLs in partition order
    (by file name): simulated node ``partition-id`` i reads the i-th."""
    if not (fed.cohort_dir or fed.sites_dir):
        raise ConfigError(
            "simulation needs run config `cohort-dir` (a synthetic cohort) or "
            "`sites-dir` (a folder of site YAMLs)"
        )
    folder = Path(fed.sites_dir or Path(fed.cohort_dir) / SITE_CONFIGS)
    return folder, sorted(folder.glob("*.yaml"))


def site_yaml_for(node_config: Mapping[str, Any], fed: FederationConfig) -> Path:
    """The node's site YAML: ``site-config``, else the partition's cohort site."""
    if "site-config" in node_config:
        return Path(str(node_config["site-config"]))
    if "partition-id" not in node_config:
        raise ConfigError("node config needs `site-config` (the site YAML path)")
    folder, yamls = simulation_site_yamls(fed)
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(yamls):
        raise ConfigError(
            f"partition {pid} has no site YAML in {folder} ({len(yamls)} found)"
        )
    return yamls[pid]


def load_site(
    node_config: Mapping[str, Any], fed: FederationConfig, plan: Plan
) -> SiteState:
    """The site's datasets under ``plan`` (loaded once, then reused)."""
    path = site_yaml_for(node_config, fed)
    key = (str(path.resolve()), json.dumps(plan.to_dict(), sort_keys=True))
    if key not in _SITES:
        config = load_site_config(path)
        check_plan_usable(config, plan)
        train, val, _ = build_site_datasets(
            config,
            plan,
            seed=fed.seed,
            augment=fed.augment,
            cache=True,
            store=config.run_dir / PREPROCESSED,
        )
        if config.privacy is not None:
            check_delta(config.privacy, len(train), str(path))
        regimens = train.regimen_indices()
        counts = {
            SHARED: len(train),
            **{expert_group(r): regimens.count(j) for j, r in enumerate(REGIMENS)},
        }
        _SITES[key] = SiteState(config, plan, train, val, counts)
    return _SITES[key]


def prepare_round(
    request: RoundRequest,
    arrays: Mapping[str, np.ndarray],
    node_config: Mapping[str, Any],
) -> RoundSetup:
    """Parse the request (at the site's edge), load the site, build the model
    with the global weights, and seed this round."""
    fed = FederationConfig.from_run_config(dict(request.run_config))
    plan = Plan.from_dict(dict(request.plan))
    site = load_site(node_config, fed, plan)
    model = build_model(ModelConfig.from_dict(dict(request.model_config)))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    torch.manual_seed(fed.seed + request.server_round)
    return RoundSetup(
        fed,
        site,
        model,
        resolve_device(site.config.device),
        request,
        simulated="partition-id" in node_config,
    )
