"""The site YAML: a hospital's private settings, parsed in exactly one place.

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
      release_evaluation: false    # send validation counts (not DP) to the server
    approved_apps:                 # optional; the apps this site runs under app
      - "<64 hex: moefl app-hash>" # pinning (client/app_pinning.py), by SHA-256

Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared_model.errors import ConfigError
from shared_model.federation_config import SITE_NAME

ROLES = ("train", "evaluate", "public")
"""``public``: a public segmentation dataset (images and masks, no clinical.csv)
for ``moefl pretrain`` only (:mod:`client.public_data`)."""
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
)
PRIVACY_KEYS = ("target_epsilon", "delta", "max_grad_norm")
PRIVACY_OPTIONAL_KEYS = ("secure_mode", "public_backbones", "release_evaluation")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PrivacyConfig:
    """The differential-privacy budget a site accepts (sample-level DP-SGD)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    secure_mode: bool = False
    public_backbones: tuple[str, ...] = ()
    release_evaluation: bool = False


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

    @property
    def adc_scale(self) -> float:
        """Factor that converts the site's stored ADC to 10^-3 mm^2/s."""
        return 1.0 if self.adc_unit == "1e-3" else 1e-3


@dataclass(frozen=True)
class YamlProblem:
    """One problem found in a site YAML: the key, what is wrong, how to fix it."""

    key: str
    message: str
    fix: str


def _number(
    value: Any,
    key: str,
    problems: list[YamlProblem],
    *,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        problems.append(
            YamlProblem(
                key,
                f"`{key}` is {value!r}; expected a "
                f"{'whole number' if kind is int else 'number'}",
                f"set `{key}` to a {kind.__name__}",
            )
        )
        return None
    if not math.isfinite(value):
        problems.append(
            YamlProblem(
                key,
                f"`{key}` is {value}; expected a finite number",
                f"set `{key}` to a finite {kind.__name__}",
            )
        )
        return None
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        problems.append(
            YamlProblem(
                key,
                f"`{key}` is {value}; expected a value {rng}",
                f"set `{key}` inside that range",
            )
        )
        return None
    return kind(value)


def parse_site_yaml(path: Path) -> tuple[SiteConfig | None, list[YamlProblem]]:
    """Read and validate a site YAML, collecting every problem in one pass.

    Returns:
        ``(config, problems)``: ``config`` is ``None`` when any problem is found.
    """
    path = Path(path)
    problems: list[YamlProblem] = []
    try:
        text = path.read_text()
    except OSError as e:
        return None, [
            YamlProblem(
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
            YamlProblem(
                "(syntax)",
                f"not valid YAML{where}: {e}",
                "fix the YAML syntax (indentation, quotes, colons)",
            )
        ]
    if not isinstance(raw, dict):
        return None, [
            YamlProblem(
                "(top level)",
                "the site YAML must be a mapping of keys",
                "see site_configs/README.md for the schema",
            )
        ]

    for key in raw:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            problems.append(
                YamlProblem(
                    str(key),
                    f"unknown key `{key}`",
                    f"remove it or correct its spelling; allowed keys: "
                    f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}",
                )
            )
    for key in REQUIRED_KEYS:
        if raw.get(key) in (None, ""):
            problems.append(
                YamlProblem(
                    key,
                    f"required key `{key}` is missing",
                    f"add `{key}:` (see site_configs/README.md)",
                )
            )
    base = path.resolve().parent

    site_name = raw.get("site_name")
    if site_name is not None and not (
        isinstance(site_name, str) and SITE_NAME.match(site_name)
    ):
        problems.append(
            YamlProblem(
                "site_name",
                f"`site_name` is {site_name!r}",
                "use lower-case letters, digits and _ (e.g. west_china)",
            )
        )
    role = raw.get("role", "train")
    if role not in ROLES:
        problems.append(
            YamlProblem(
                "role",
                f"`role` is {role!r}; expected one of {ROLES}",
                "train: joins training; evaluate: validation only",
            )
        )
    adc_unit = str(raw.get("adc_unit", "1e-3"))
    if adc_unit not in ADC_UNITS:
        problems.append(
            YamlProblem(
                "adc_unit",
                f"`adc_unit` is {raw.get('adc_unit')!r}; expected one of {ADC_UNITS}",
                'write the unit of the stored ADC values in mm^2/s, quoted: "1e-3" or "1e-6"',
            )
        )

    dataset_dir: Path | None = None
    if isinstance(raw.get("dataset_dir"), str) and raw["dataset_dir"]:
        dataset_dir = (base / raw["dataset_dir"]).resolve()
        if not dataset_dir.is_dir():
            problems.append(
                YamlProblem(
                    "dataset_dir",
                    f"`dataset_dir` {dataset_dir} does not exist or is not a folder",
                    "point it at the nnU-Net raw dataset folder (DatasetNNN_Name)",
                )
            )
            dataset_dir = None
    elif raw.get("dataset_dir") not in (None, ""):
        problems.append(
            YamlProblem(
                "dataset_dir",
                "`dataset_dir` must be a path string",
                "write the folder path as text",
            )
        )
    run_raw = raw.get("run_dir")
    if run_raw is not None and not isinstance(run_raw, str):
        problems.append(
            YamlProblem(
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
            YamlProblem(
                "run_dir",
                f"`run_dir` {run_dir} lies inside the dataset folder",
                "moefl never writes into site data: choose a run_dir outside dataset_dir",
            )
        )

    default_min = 10 if role == "train" else 1
    min_cases = _number(
        raw.get("min_cases", default_min), "min_cases", problems, kind=int, low=1
    )
    device = raw.get("device", "auto")
    if not (isinstance(device, str) and _DEVICE.match(device)):
        problems.append(
            YamlProblem(
                "device", f"`device` is {device!r}", "use auto, cpu, cuda or cuda:N"
            )
        )
    num_workers = _number(
        raw.get("num_workers", 0), "num_workers", problems, kind=int, low=0
    )
    val_fraction = _number(
        raw.get("val_fraction", 0.2),
        "val_fraction",
        problems,
        kind=float,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    split_seed = _number(
        raw.get("split_seed", 0), "split_seed", problems, kind=int, low=0
    )

    privacy = None
    if raw.get("privacy") is not None:
        privacy = parse_privacy(raw["privacy"], problems)
    approved_apps = parse_approved_apps(raw.get("approved_apps"), problems)

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
    ), []


def parse_privacy(raw: Any, problems: list[YamlProblem]) -> PrivacyConfig | None:
    if not isinstance(raw, dict):
        problems.append(
            YamlProblem(
                "privacy",
                "`privacy` must be a mapping",
                "give target_epsilon, delta and max_grad_norm under it",
            )
        )
        return None
    n_before = len(problems)
    for key in raw:
        if key not in PRIVACY_KEYS + PRIVACY_OPTIONAL_KEYS:
            problems.append(
                YamlProblem(
                    f"privacy.{key}",
                    f"unknown key `privacy.{key}`",
                    f"allowed: {', '.join(PRIVACY_KEYS + PRIVACY_OPTIONAL_KEYS)}",
                )
            )
    values: dict[str, Any] = {}
    bounds: tuple[tuple[str, dict[str, Any]], ...] = (
        ("target_epsilon", {"low": 0.0, "low_open": True}),
        ("delta", {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}),
        ("max_grad_norm", {"low": 0.0, "low_open": True}),
    )
    for key, kwargs in bounds:
        if key not in raw:
            problems.append(
                YamlProblem(
                    f"privacy.{key}",
                    f"`privacy.{key}` is missing",
                    "all three privacy keys are required together",
                )
            )
            continue
        values[key] = _number(
            raw[key], f"privacy.{key}", problems, kind=float, **kwargs
        )
    for key in ("secure_mode", "release_evaluation"):
        if key in raw:
            if not isinstance(raw[key], bool):
                problems.append(
                    YamlProblem(
                        f"privacy.{key}",
                        f"`privacy.{key}` is {raw[key]!r}; expected true or false",
                        f"set `privacy.{key}` to true or false",
                    )
                )
            else:
                values[key] = raw[key]
    if "public_backbones" in raw:
        hashes = raw["public_backbones"] or []
        if not isinstance(hashes, list) or not all(
            isinstance(h, str) and _SHA256.match(h) for h in hashes
        ):
            problems.append(
                YamlProblem(
                    "privacy.public_backbones",
                    "`privacy.public_backbones` must be a list of SHA-256 hex digests",
                    "copy each accepted backbone's `sha256` from `moefl pretrain`'s "
                    "output (64 lower-case hex characters)",
                )
            )
        else:
            values["public_backbones"] = tuple(hashes)
    if len(problems) > n_before:
        return None
    return PrivacyConfig(**values)


def parse_approved_apps(raw: Any, problems: list[YamlProblem]) -> tuple[str, ...]:
    """``approved_apps``: the app hashes a site runs under app pinning.

    Each entry is what ``client.app_pinning.app_hash`` prints for an app the site
    has reviewed. A malformed entry is an error, not skipped: silently dropping it
    would refuse the app the site meant to approve, or hide a typo.
    """
    if raw is None:
        return ()
    fix = (
        "review the app, then copy the hash that `moefl app-hash <app folder or .fab>` "
        'prints, quoted: - "<64 hex characters>"'
    )
    if not isinstance(raw, list):
        problems.append(
            YamlProblem(
                "approved_apps",
                f"`approved_apps` is {raw!r}; expected a list of SHA-256 hex digests",
                fix,
            )
        )
        return ()
    n_before = len(problems)
    for i, value in enumerate(raw):
        if not (isinstance(value, str) and _SHA256.match(value)):
            problems.append(
                YamlProblem(
                    f"approved_apps[{i}]",
                    f"`approved_apps[{i}]` is {value!r}; expected 64 lower-case hex "
                    "characters (a SHA-256)",
                    fix,
                )
            )
    return tuple(raw) if len(problems) == n_before else ()


def load_site_config(path: Path) -> SiteConfig:
    """Parse a site YAML or raise :class:`ConfigError` listing every problem."""
    config, problems = parse_site_yaml(path)
    if config is None:
        lines = "\n".join(f"  - {p.key}: {p.message} (fix: {p.fix})" for p in problems)
        raise ConfigError(f"{path}: invalid site config\n{lines}")
    return config
