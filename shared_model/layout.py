"""Folder names on disk, in one place: a synthetic cohort's and a site's run
folder's.

A synthetic cohort (``moefl synth``)::

    sites/DatasetNNN_<Site>/            nnU-Net raw dataset + clinical.csv, per site
    site_configs/<site>.yaml            a site YAML per retrospective site
    prospective/sites/..., prospective/site_configs/   the prospective cohort
    test/sites/..., test/site_configs/  the held-out test cohort
    oracle/potential_outcomes.csv       the truth (never read by training)
    cohort.json, plan.json              what was drawn; the cohort's plan

A site's run folder (its YAML's ``run_dir``) holds ``preprocessed/`` (the
volumes resampled to the plan) and ``feature_cache/`` (the frozen backbone's
tumour features). The plan's own file name is
:data:`shared_model.plan.PLAN_FILE`.
"""

from __future__ import annotations

from pathlib import Path

# a synthetic cohort
SITE_DATASETS = "sites"
"""The folder of the sites' nnU-Net raw datasets (and clinical tables)."""
SITE_CONFIGS = "site_configs"
PROSPECTIVE = "prospective"
TEST = "test"
ORACLE = "oracle"
POTENTIAL_OUTCOMES = "potential_outcomes.csv"
COHORT_RECORD = "cohort.json"
RETROSPECTIVE = "retrospective"
"""The cohort whose folders sit at the cohort's root (the training sites)."""

# a site's run folder
PREPROCESSED = "preprocessed"
FEATURE_CACHE = "feature_cache"


def cohort_part(cohort_dir: str | Path, cohort: str = RETROSPECTIVE) -> Path:
    """The folder of one of a synthetic cohort's parts: the root for the
    retrospective (training) sites, ``prospective/`` or ``test/`` else."""
    return Path(cohort_dir) if cohort == RETROSPECTIVE else Path(cohort_dir) / cohort


def site_configs(cohort_dir: str | Path, cohort: str = RETROSPECTIVE) -> Path:
    """The folder of a cohort part's site YAMLs."""
    return cohort_part(cohort_dir, cohort) / SITE_CONFIGS


def site_yamls(cohort_dir: str | Path, cohort: str = RETROSPECTIVE) -> list[Path]:
    """A cohort part's site YAMLs, sorted."""
    return sorted(site_configs(cohort_dir, cohort).glob("*.yaml"))


def cohort_of(site_yaml: str | Path) -> Path:
    """The cohort folder a site YAML of ``site_configs/`` belongs to."""
    return Path(site_yaml).resolve().parent.parent


def oracle_dir(cohort_dir: str | Path) -> Path:
    """The cohort's truth (potential outcomes, latents)."""
    return Path(cohort_dir) / ORACLE
