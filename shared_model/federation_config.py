"""Federation-wide settings: ``[tool.flwr.app.config]``, parsed in one place.

Keys are kebab-case, as Flower's ``--run-config`` expects; every key has a
default, so simulation (which may pass an empty run config) works. Unknown
keys and out-of-range values are errors that name the key.

| key | default | meaning |
|---|---|---|
| num-server-rounds | 3 | federated rounds |
| local-epochs | 1 | local passes over a site's training patients per round |
| local-steps | 0 | if > 0: exactly this many local steps instead of epochs |
| batch-size | 4 | patients per local step |
| lr | 0.001 | initial local learning rate |
| lr-schedule | poly | poly: nnU-Net's poly decay across all rounds; constant |
| optimizer | adamw | adamw, or sgd (Nesterov 0.99). A fresh SGD with momentum 0.99 at
  every round barely moves in a round of a few dozen steps (demo: Dice 0.05 after two
  rounds, against 0.50 with AdamW), so federated runs default to AdamW |
| strategy | fedavg | fedavg, fedprox (proximal term at the site), fedadam (Adam at the
  server); names three separate parts, :class:`StrategyParts` |
| proximal-mu | 0.01 | FedProx mu |
| server-lr | 0.01 | FedAdam server learning rate |
| server-beta1, server-beta2, server-tau | 0.9, 0.99, 0.001 | FedAdam |
| min-sites | 2 | sites needed for a round to update the model |
| min-sites-per-expert | 1 | sites that must train an expert for it to change |
| round-timeout | 3600 | seconds to wait for replies |
| evaluate-every | 1 | federated evaluation every k rounds (0: never) |
| run-dir | runs/federated | checkpoints and metrics.json (on the coordinator) |
| resume | true | continue from the run folder's last checkpoint |
| cohort-dir | "" | simulation: the synthetic cohort whose site YAMLs the partitions use |
| plan | "" | plan.json, or `federated`: the plan from the sites' fingerprints (the planning
  query). Default: the cohort's plan.json (simulation), else the pretrained backbone's,
  else `federated` |
| plan-only | false | run the planning query, write plan.json and plan_fingerprint.json
  in `run-dir`, and stop |
| plan-memory-gb | 8.0 | federated planning: the GPU memory a patch may take (nnU-Net's
  8 GB reference budget scales with it) |
| base-filters, max-filters | 8, 256 | network widths (nnU-Net: 32, 320) |
| augment | true | MONAI augmentation at the sites |
| seed | 0 | seeds the server and every site |
| sites-dir | "" | simulation: folder of the site YAMLs (default: `<cohort-dir>/site_configs`) |
| dp-noise-multiplier | 0.0 | sample-level DP at sites with a `privacy` section: the noise
  multiplier; 0 lets each site derive it from its own budget over the planned rounds |
| dp-accountant | rdp | opacus accountant for the sites' epsilon: rdp or prv |
| client-dp-noise-multiplier | 0.0 | client-level (central) DP at the server: noise
  multiplier on the clipped per-site updates; 0 disables it |
| client-dp-clip | 0.0 | client-level DP: L2 clip of each site's whole update (needed
  with noise) |
| client-dp-delta | 0.001 | client-level DP: the delta its epsilon is reported at |
| target-sensitivity | 0.8 | evaluation: the second operating point, the highest threshold
  reaching this sensitivity on the validation set (the first is 0.5) |
| recommendation-margin | 0.05 | evaluation: recommend the least intensive regimen whose
  predicted pCR is within this of the best |
| training | staged | staged: `num-server-rounds` rounds of segmentation (Dice + CE) only,
  then `head-rounds` rounds in which each site trains the pCR heads over features it
  computed once with the frozen backbone and cached on its own disk; joint: the study's
  multi-task training (segmentation and pCR together) in every round |
| head-rounds | 20 | staged: federated rounds of head training |
| head-epochs | 10 | staged: local passes over a site's cached features per head round |
| head-lr | 0.001 | staged: AdamW learning rate of the heads |
| head-batch-size | 32 | staged: patients per head step |
| features | tumour | tumour: statistics inside the predicted tumour on the input grid;
  stem: the study's modality stems on a 4x coarser grid (joint training only) |
| experts | residual | residual: shared prognosis head plus one expert per regimen;
  independent: the study's three separate experts |
| embed-dim | 32 | tumour features: size of each modality embedding of the heads (the
  study's independent experts use 64); smaller heads take less DP noise |
| head-type | linear | tumour features: mlp (a two-layer embedding per modality) or linear
  (the feature blocks feed the linear experts directly: a logistic regression with
  regimen interactions, the head DP-SGD can train) |
| use-clinical | true | false builds the image-only comparator (no clinical input) |
| min-expert-support | 30 | margin and argmax rules: an expert trained on fewer patients
  (summed over sites) is never recommended; the switch rule weighs the support through the
  posterior instead |
| backbone | "" | staged: a pretrained backbone artifact (`moefl pretrain`, on the
  coordinator); the federation then trains the heads alone over it for `head-rounds`
  rounds (no segmentation rounds) — the only staged federation DP sites join |
| dp-head-sample-rate | 0.5 | DP head rounds: each patient joins a step with this
  probability (expected batch: this share of the site); a round takes
  `ceil(head-epochs / rate)` steps |
| dp-head-lr | 0.03 | DP head rounds: SGD (momentum 0.9) at this rate; AdamW's per-coordinate
  scaling amplifies the DP noise (measured: AUC 0.53 against 0.72 on the demo cohort) |
| dp-reproducible | false | simulation only: seed the central DP noise from `seed`. Never in
  deployment: whoever knows the seed could subtract the noise |
| aggregation | mean | mean (count-weighted), median or trimmed-mean (coordinate-wise over
  the sites that trained a group, unweighted) |
| trim-fraction | 0.2 | trimmed-mean: the share of sites cut from each end per coordinate |
| update-bound | 4.0 | each site's update of a group is scaled down to this multiple of the
  round's reference step (the lower median of the sites' RMS steps) times the square root
  of the group's size; 0 turns the bound off (:mod:`shared_model.robust`) |
| max-site-share | 0.5 | no site's share of a group's weight above this while two or more
  sites trained the group |
| allow-unregistered-sites | false | deployment: accept a reply from a node registered
  without a name under the site name the reply claims (insecure: a name is not an
  identity); the default refuses such replies |
| head-fit | newton | staged: newton (head-type linear: the pooled Bayesian logistic
  regression by federated Newton steps, its Laplace posterior recalibrated on the
  validation split, and the advice rule chosen there; :mod:`shared_model.posterior`), or
  rounds (FedAvg of the heads over `head-rounds` rounds: head-type mlp, independent
  experts, and DP sites, which do not release exact sums) |
| prior-grid | "0.3 1 3 10 30" | newton: the prior precisions fitted side by side; the one
  with the lowest federated validation log-loss is kept |
| newton-rounds | 12 | newton: at most this many Newton steps (each one message wave) |
| advice-rule | switch | newton: switch (keep a reference regimen unless the posterior
  says another gains with probability >= q), margin or argmax |
| gain-threshold | choose | switch: q, or `choose`: the q among 0.8, 0.9, 0.95 (or never
  switching) with the best doubly robust value on the federated validation split |
| guideline-regimen | TNT | switch: the reference unless another regimen is better with
  confidence on the validation split |
| secure-aggregation | false | training rounds by secure aggregation
  (:mod:`server.secure_round`): the coordinator learns only each group's sums; needs
  `client-dp-clip` (each site clips its own update); with `client-dp-noise-multiplier`
  the noise is added by the sites (distributed DP) |
| secagg-threshold | 0 | secure aggregation: the sites whose shares unmask a round; 0 is a
  majority of the round's sites (at least 2) |
| secagg-max-patients | 1000 | secure aggregation: the largest weight a site's update
  carries (its patients, capped here), which sets the quantization range |
| secagg-min-group-sites | 2 | secure aggregation: a group trained by fewer sites is a small
  group; each of its sites applies its YAML's `secure_aggregation.small_groups` |
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeGuard

from shared_model.errors import ConfigError
from shared_model.federation_checks import (
    FEDERATED_PLAN,
    check_config,
)
from shared_model.plan import plan_file
from shared_model.policy import DEFAULT_MARGIN, DEFAULT_MIN_SUPPORT, GUIDELINE

SERVER_OPTIMIZERS = ("none", "adam")


@dataclass(frozen=True)
class StrategyParts:
    """The three separate things the ``strategy`` key names together
    (:attr:`FederationConfig.strategy_parts`; no run-config keys of their own,
    so every existing run config means what it meant):

    * ``proximal_mu``: the sites' FedProx term, ``proximal-mu`` under
      ``fedprox`` and 0 (none) otherwise;
    * ``server_optimizer``: ``adam`` (FedAdam: ``server-lr``,
      ``server-beta1``, ``server-beta2``, ``server-tau``) under ``fedadam``,
      ``none`` otherwise (the aggregate is the new model);
    * ``aggregation``: the rule, ``aggregation`` under every strategy
      (:data:`shared_model.robust.AGGREGATION_RULES`).
    """

    proximal_mu: float
    server_optimizer: str
    aggregation: str


STAGES = ("joint", "segmentation", "heads")
"""What a round trains: everything with the multi-task loss (``joint``), the
backbone on segmentation alone, or the pCR heads over cached features."""

SITE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
r"""A site's name, everywhere it appears (site YAML, site keys, run records,
replies): lower-case letters, digits and _, starting with a letter, at most 64
characters; also a safe file name. Match it with ``fullmatch`` (``\Z``: no
trailing newline slips through)."""


def is_site_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid site name (:data:`SITE_NAME`)."""
    return isinstance(value, str) and SITE_NAME.fullmatch(value) is not None


@dataclass(frozen=True)
class FederationConfig:
    """Typed federation settings (see the module docstring for the keys)."""

    num_server_rounds: int = 3
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 4
    lr: float = 0.001
    lr_schedule: str = "poly"
    optimizer: str = "adamw"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    min_sites: int = 2
    min_sites_per_expert: int = 1
    round_timeout: float = 3600.0
    evaluate_every: int = 1
    run_dir: str = "runs/federated"
    resume: bool = True
    resume_changed_config: bool = False
    cohort_dir: str = ""
    plan: str = ""
    plan_only: bool = False
    plan_memory_gb: float = 8.0
    base_filters: int = 8
    max_filters: int = 256
    augment: bool = True
    seed: int = 0
    sites_dir: str = ""
    dp_noise_multiplier: float = 0.0
    dp_accountant: str = "rdp"
    client_dp_noise_multiplier: float = 0.0
    client_dp_clip: float = 0.0
    client_dp_delta: float = 1e-3
    dp_reproducible: bool = False
    target_sensitivity: float = 0.8
    recommendation_margin: float = DEFAULT_MARGIN
    training: str = "staged"
    head_rounds: int = 20
    head_epochs: int = 10
    head_lr: float = 0.001
    head_batch_size: int = 32
    features: str = "tumour"
    experts: str = "residual"
    use_clinical: bool = True
    embed_dim: int = 32
    head_type: str = "linear"
    min_expert_support: int = DEFAULT_MIN_SUPPORT
    backbone: str = ""
    dp_head_sample_rate: float = 0.5
    dp_head_lr: float = 0.03
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    update_bound: float = 4.0
    max_site_share: float = 0.5
    allow_unregistered_sites: bool = False
    head_fit: str = "newton"
    prior_grid: str = "0.3 1 3 10 30"
    newton_rounds: int = 12
    advice_rule: str = "switch"
    gain_threshold: str = "choose"
    guideline_regimen: str = GUIDELINE
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_max_patients: int = 1000
    secagg_min_group_sites: int = 2

    @property
    def fits_posterior(self) -> bool:
        """Whether the heads are fitted by federated Newton steps (after the
        segmentation rounds) instead of head rounds."""
        return self.training == "staged" and self.head_fit == "newton"

    @property
    def strategy_parts(self) -> StrategyParts:
        """``strategy`` as its three parts (:class:`StrategyParts`)."""
        return StrategyParts(
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            server_optimizer="adam" if self.strategy == "fedadam" else "none",
            aggregation=self.aggregation,
        )

    @property
    def priors(self) -> tuple[float, ...]:
        """``prior-grid`` as numbers."""
        return tuple(float(x) for x in self.prior_grid.split())

    def plans_from_fingerprints(self) -> bool:
        """Whether the run's first step is the planning query: ``plan`` says
        so, or there is no plan.json, cohort plan or backbone to take one from."""
        if self.plan == FEDERATED_PLAN or self.plan_only:
            return True
        return not (plan_file(self.plan, self.cohort_dir) or self.backbone)

    @property
    def segmentation_rounds(self) -> int:
        """Rounds that train the backbone (none over a pretrained backbone)."""
        if self.training == "joint":
            return 0
        return 0 if self.backbone else self.num_server_rounds

    @property
    def total_rounds(self) -> int:
        """Rounds of the whole run (segmentation and head rounds when staged;
        no head rounds when the heads are fitted by Newton steps)."""
        if self.training == "joint":
            return self.num_server_rounds
        if self.fits_posterior:
            return self.segmentation_rounds
        return self.segmentation_rounds + self.head_rounds

    def local_steps_for(self, n_patients: int) -> int:
        """Local steps of a segmentation or joint round at a site of
        ``n_patients`` training patients."""
        return self.local_steps or self.local_epochs * -(-n_patients // self.batch_size)

    @property
    def dp_head_steps(self) -> int:
        """DP-SGD steps of one DP head round: ``head-epochs`` expected passes."""
        return math.ceil(self.head_epochs / self.dp_head_sample_rate)

    def stage_of(self, server_round: int) -> str:
        """What round ``server_round`` (1-based) trains (see :data:`STAGES`)."""
        if self.training == "joint":
            return "joint"
        return "segmentation" if server_round <= self.segmentation_rounds else "heads"

    def __post_init__(self) -> None:
        check_config(self)

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any] | None) -> FederationConfig:
        """Parse a Flower run config (kebab-case keys); missing keys get defaults."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in (raw or {}).items():
            if key not in known:
                raise ConfigError(
                    f"unknown run config key `{key}`; known keys: "
                    f"{', '.join(sorted(known))}"
                )
            f = known[key]
            kind: type = type(f.default)
            try:
                if kind is bool:
                    if isinstance(value, str):
                        if value.lower() not in ("true", "false"):
                            raise ValueError(value)
                        value = value.lower() == "true"
                    values[f.name] = bool(value)
                elif kind is int:
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(value)
                    values[f.name] = int(value)
                else:
                    values[f.name] = kind(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"run config `{key}` = {value!r} is not a valid {kind.__name__}"
                ) from e
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def parse_run_config(text: str) -> dict[str, Any]:
    """Flower-style ``"key=value key2='text'"`` into a dict (numbers, booleans, text)."""
    import shlex

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"--run-config item {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    continue
        out[key.strip()] = parsed
    return out
