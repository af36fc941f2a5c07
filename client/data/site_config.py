"""The site YAML: a hospital's private settings, parsed (and written) in exactly
one place.

Schema (documented for sites in ``site_configs/README.md``)::

    site_name: west_china          # required; lower-case letters, digits, _
    role: train                    # train | evaluate | public   (default train)
    dataset_dir: ../sites/Dataset101_WestChina   # required; nnU-Net raw folder
    adc_unit: "1e-3"               # "1e-3" | "1e-6" mm^2/s      (default "1e-3")
    run_dir: ../runs/west_china    # site-private outputs      (default <yaml dir>/runs/<site>)
    min_cases: 10                  # fewer usable cases is an error (default 10, evaluate 1)
    device: auto                   # auto | cpu | cuda | cuda:N  (default auto)
    num_workers: 0                 # data-loading processes      (default 0)
    val_fraction: 0.2              # validation share of the split (default 0.2)
    split_seed: 0                  # seed of the split            (default 0)
    privacy:                       # optional; what the site accepts under DP
      target_epsilon: 8.0
      delta: 1.0e-5
      max_grad_norm: 1.0
      secure_mode: false           # opacus noise robust to floating-point attacks
      public_backbones: []         # SHA-256 of the backbones the site accepts
                                   # (empty: the one the federation declares)
      release_evaluation: false    # validation counts: false withholds them, dp
                                   # sends them noised at evaluation_epsilon per
                                   # round (charged to the budget), true sends
                                   # them exactly (NOT DP)
      # evaluation_epsilon: 1.0    # with release_evaluation: dp only
    secure_aggregation: required   # optional; refuse rounds not securely aggregated
                                   # (client/data/secure_config.py: small groups)
    approved_apps:                 # optional; the apps this site runs under app
      - "<64 hex: moefl app-hash>" # pinning (client/node/app_pinning.py), by SHA-256

Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client.data.privacy_config import PrivacyConfig, parse_privacy
from client.data.secure_config import (
    SecureAggregationConfig,
    parse_secure_aggregation,
)
from client.data.site_access import parse_approved_apps as parse_approved_apps
from client.data.site_access import parse_image_roots as parse_image_roots
from client.problem import Problem, yaml_number, yaml_problem
from shared_model.errors import ConfigError
from shared_model.federation_config import is_site_name

ROLES = ("train", "evaluate", "public")
"""``public``: a public segmentation dataset (images and masks, no clinical.csv)
for ``moefl pretrain`` only (:mod:`client.data.public_data`)."""
ADC_UNITS = ("1e-3", "1e-6")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

REQUIRED_KEYS = ("site_name", "dataset_dir")
OPTIONAL_KEYS = (
    "role",
    "adc_unit",
    "run_dir",
    "min_cases",
    "device",
    "num_workers",
    "val_fraction",
    "split_seed",
    "privacy",
    "approved_apps",
    "image_roots",
    "secure_aggregation",
)


@dataclass(frozen=True)
class SiteConfig:
    """A validated site YAML. Paths are absolute."""

    path: Path
    site_name: str
    role: str
    dataset_dir: Path
    adc_unit: str
    run_dir: Path
    min_cases: int
    device: str
    num_workers: int
    val_fraction: float
    split_seed: int
    privacy: PrivacyConfig | None
    approved_apps: tuple[str, ...] = ()
    image_roots: tuple[Path, ...] = ()  # folders images may resolve into
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @property
    def adc_scale(self) -> float:
        """Factor that converts the site's stored ADC to 10^-3 mm^2/s."""
        return 1.0 if self.adc_unit == "1e-3" else 1e-3


def parse_site_yaml(path: Path) -> tuple[SiteConfig | None, list[Problem]]:
    """Read and validate a site YAML, collecting every problem in one pass.

    Returns:
        ``(config, problems)``: ``config`` is ``None`` when any problem is found.
    """
    path = Path(path)
    raw, problems = _load_mapping(path)
    if raw is None:
        return None, problems

    _check_keys(raw, problems)
    base = path.resolve().parent
    site_name, role, adc_unit = _parse_identity(raw, problems)
    dataset_dir, run_dir = _parse_paths(raw, base, site_name, problems)
    min_cases, device, num_workers = _parse_resources(raw, role, problems)
    val_fraction, split_seed = _parse_split(raw, problems)

    privacy = None
    if raw.get("privacy") is not None:
        privacy = parse_privacy(raw["privacy"], problems)
    approved_apps = parse_approved_apps(raw.get("approved_apps"), problems)
    image_roots = parse_image_roots(raw.get("image_roots"), base, problems)
    secure = parse_secure_aggregation(raw.get("secure_aggregation"), problems)

    if problems or dataset_dir is None:
        return None, problems
    return SiteConfig(
        path=path.resolve(),
        site_name=str(site_name),
        role=str(role),
        dataset_dir=dataset_dir,
        adc_unit=adc_unit,
        run_dir=run_dir,
        min_cases=min_cases,
        device=str(device),
        num_workers=num_workers,
        val_fraction=val_fraction,
        split_seed=split_seed,
        privacy=privacy,
        approved_apps=approved_apps,
        image_roots=image_roots,
        secure_aggregation=secure,
    ), []


def _load_mapping(path: Path) -> tuple[dict[Any, Any] | None, list[Problem]]:
    """The YAML file's top-level mapping, or ``None`` and the one problem
    (unreadable, not YAML, not a mapping) that stops the parse."""
    try:
        text = path.read_text()
    except OSError as e:
        return None, [
            yaml_problem(
                "(file)",
                f"cannot read the site YAML ({e.strerror})",
                "check the path passed to moefl",
            )
        ]
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return None, [
            yaml_problem(
                "(syntax)",
                f"not valid YAML{where}: {e}",
                "fix the YAML syntax (indentation, quotes, colons)",
            )
        ]
    if not isinstance(raw, dict):
        return None, [
            yaml_problem(
                "(top level)",
                "the site YAML must be a mapping of keys",
                "see site_configs/README.md for the schema",
            )
        ]
    return raw, []


def _check_keys(raw: dict[Any, Any], problems: list[Problem]) -> None:
    """Unknown keys and missing required keys."""
    for key in raw:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            problems.append(
                yaml_problem(
                    str(key),
                    f"unknown key `{key}`",
                    f"remove it or correct its spelling; allowed keys: "
                    f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}",
                )
            )
    for key in REQUIRED_KEYS:
        if raw.get(key) in (None, ""):
            problems.append(
                yaml_problem(
                    key,
                    f"required key `{key}` is missing",
                    f"add `{key}:` (see site_configs/README.md)",
                )
            )


def _parse_identity(
    raw: dict[Any, Any], problems: list[Problem]
) -> tuple[Any, Any, str]:
    """``site_name``, ``role`` and ``adc_unit`` (as written; checked)."""
    site_name = raw.get("site_name")
    if site_name is not None and not is_site_name(site_name):
        problems.append(
            yaml_problem(
                "site_name",
                f"`site_name` is {site_name!r}",
                "use lower-case letters, digits and _ (e.g. west_china)",
            )
        )
    role = raw.get("role", "train")
    if role not in ROLES:
        problems.append(
            yaml_problem(
                "role",
                f"`role` is {role!r}; expected one of {ROLES}",
                "train: joins training; evaluate: validation only",
            )
        )
    adc_unit = str(raw.get("adc_unit", "1e-3"))
    if adc_unit not in ADC_UNITS:
        problems.append(
            yaml_problem(
                "adc_unit",
                f"`adc_unit` is {raw.get('adc_unit')!r}; expected one of {ADC_UNITS}",
                'write the unit of the stored ADC values in mm^2/s, quoted: "1e-3" or "1e-6"',
            )
        )
    return site_name, role, adc_unit


def _parse_paths(
    raw: dict[Any, Any], base: Path, site_name: Any, problems: list[Problem]
) -> tuple[Path | None, Path]:
    """``dataset_dir`` (``None`` when unusable) and ``run_dir``, resolved
    against ``base``; the run folder may not lie inside the dataset."""
    dataset_dir: Path | None = None
    if isinstance(raw.get("dataset_dir"), str) and raw["dataset_dir"]:
        dataset_dir = (base / raw["dataset_dir"]).resolve()
        if not dataset_dir.is_dir():
            problems.append(
                yaml_problem(
                    "dataset_dir",
                    f"`dataset_dir` {dataset_dir} does not exist or is not a folder",
                    "point it at the nnU-Net raw dataset folder (DatasetNNN_Name)",
                )
            )
            dataset_dir = None
    elif raw.get("dataset_dir") not in (None, ""):
        problems.append(
            yaml_problem(
                "dataset_dir",
                "`dataset_dir` must be a path string",
                "write the folder path as text",
            )
        )
    run_raw = raw.get("run_dir")
    if run_raw is not None and not isinstance(run_raw, str):
        problems.append(
            yaml_problem(
                "run_dir",
                "`run_dir` must be a path string",
                "write the folder path as text",
            )
        )
        run_raw = None
    name_for_run = site_name if isinstance(site_name, str) else "site"
    run_dir = (base / (run_raw or f"runs/{name_for_run}")).resolve()
    if dataset_dir is not None and run_dir.is_relative_to(dataset_dir):
        problems.append(
            yaml_problem(
                "run_dir",
                f"`run_dir` {run_dir} lies inside the dataset folder",
                "moefl never writes into site data: choose a run_dir outside dataset_dir",
            )
        )
    return dataset_dir, run_dir


def _parse_resources(
    raw: dict[Any, Any], role: Any, problems: list[Problem]
) -> tuple[Any, Any, Any]:
    """``min_cases`` (default by role), ``device`` and ``num_workers``."""
    default_min = 10 if role == "train" else 1
    min_cases = yaml_number(
        raw.get("min_cases", default_min), "min_cases", problems, kind=int, low=1
    )
    device = raw.get("device", "auto")
    if not (isinstance(device, str) and _DEVICE.match(device)):
        problems.append(
            yaml_problem(
                "device", f"`device` is {device!r}", "use auto, cpu, cuda or cuda:N"
            )
        )
    num_workers = yaml_number(
        raw.get("num_workers", 0), "num_workers", problems, kind=int, low=0
    )
    return min_cases, device, num_workers


DEFAULT_VAL_FRACTION = 0.2
"""The validation share of a site's split when its YAML sets none."""


def _parse_split(raw: dict[Any, Any], problems: list[Problem]) -> tuple[Any, Any]:
    """``val_fraction`` (strictly between 0 and 1) and ``split_seed``."""
    val_fraction = yaml_number(
        raw.get("val_fraction", DEFAULT_VAL_FRACTION),
        "val_fraction",
        problems,
        kind=float,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    split_seed = yaml_number(
        raw.get("split_seed", 0), "split_seed", problems, kind=int, low=0
    )
    return val_fraction, split_seed


def load_site_config(path: Path) -> SiteConfig:
    """Parse a site YAML or raise :class:`ConfigError` listing every problem."""
    config, problems = parse_site_yaml(path)
    if config is None:
        lines = "\n".join(
            f"  - {p.where}: {p.message} (fix: {p.fix})" for p in problems
        )
        raise ConfigError(f"{path}: invalid site config\n{lines}")
    return config


class _SiteYamlDumper(yaml.SafeDumper):
    """Quotes a string that a YAML 1.2 reader would take for a number
    (``adc_unit: "1e-3"``)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if _NUMERIC.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_NUMERIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_SiteYamlDumper.add_representer(str, _str)


def write_site_yaml(path: Path, values: dict[str, Any], *, comment: str = "") -> Path:
    """Write a site YAML (the one writer; :func:`parse_site_yaml` the one reader).

    ``values`` uses the schema's keys (an unknown key is a ConfigError, so a
    writer cannot produce what the parser refuses); ``comment`` becomes ``#``
    lines at the top.
    """
    unknown = sorted(set(values) - set(REQUIRED_KEYS + OPTIONAL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown site YAML keys {unknown}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.dump(values, Dumper=_SiteYamlDumper, sort_keys=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path
