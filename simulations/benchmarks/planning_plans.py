"""The planning benchmark's plans: moefl's from the merged fingerprints and
nnU-Net's of the cases pooled, the merged plan when every site releases its
noised fingerprint, the plan from the DP-coarsened histograms without noise,
and each site's plans alone."""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from client.checks.fingerprint import fingerprint_noise, site_fingerprint
from client.data.site_config import SiteConfig
from shared_model.fingerprint import (
    SENSITIVITY_ROWS,
    Fingerprint,
    plan_from_fingerprint,
)
from shared_model.plan import Plan
from simulations.benchmarks.nnunet_reference import NnunetPlan, agreement, nnunet_plan

POOLED_ID = 980


def plan_row(plan: Plan) -> dict[str, Any]:
    return {"spacing": list(plan.spacing), "patch_size": list(plan.patch_size)}


def dp_plans(
    fingerprints: list[Fingerprint],
    epsilon: float,
    delta: float,
    *,
    seeds: int,
    tally: int,
    reference: NnunetPlan,
    exact: Plan,
    site_index: int | None = None,
) -> dict[str, Any]:
    """The merged plan when every site releases its noised fingerprint: the
    first ``seeds`` noise seeds in full, and over ``tally`` seeds how often
    the plan is within tolerance of nnU-Net's and equal to the exact one. Site
    ``i``'s noise for seed ``s`` is drawn from ``default_rng([s, i])``
    (``site_index``: a single site's ``i``)."""
    z = fingerprint_noise(epsilon, delta)
    std = z * math.sqrt(SENSITIVITY_ROWS)
    runs, outcomes = [], Counter[str]()
    within = equal = failed = 0
    for seed in range(max(seeds, tally)):
        noised = [
            fp.noised(
                std,
                np.random.default_rng([seed, i if site_index is None else site_index]),
            )
            for i, fp in enumerate(fingerprints)
        ]
        pooled = reduce(Fingerprint.merge, noised)
        row: dict[str, Any] = {"seed": seed, "n_cases_noised": pooled.n_cases}
        try:
            plan = plan_from_fingerprint(pooled)
        except ValueError as e:  # every count of a histogram noised away
            row["error"] = str(e)
            failed += seed < tally
            outcomes["no plan"] += seed < tally
        else:
            row |= plan_row(plan)
            row["equals_exact"] = plan.spacing == exact.spacing and (
                plan.patch_size == exact.patch_size
            )
            row["vs_nnunet"] = agreement(plan, reference)
            if seed < tally:
                within += row["vs_nnunet"]["within_tolerance"]
                equal += row["equals_exact"]
                outcomes[f"{fmt(plan.spacing)} mm, {fmt(plan.patch_size)}"] += 1
        if seed < seeds:
            runs.append(row)
    shown_within = sum(
        bool(r.get("vs_nnunet", {}).get("within_tolerance")) for r in runs
    )
    shown_equal = sum(bool(r.get("equals_exact")) for r in runs)
    return {
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": round(z, 3),
        "count_std": round(std, 3),
        "runs": runs,
        "within_tolerance": f"{shown_within}/{len(runs)}",
        "equals_exact": f"{shown_equal}/{len(runs)}",
        "tally": {
            "seeds": tally,
            "within_tolerance": within,
            "equals_exact": equal,
            "no_plan": failed,
            "plans": dict(outcomes.most_common()),
        },
    }


def coarsened_plan(fingerprints: list[Fingerprint]) -> Plan:
    """The plan from the sites' DP-coarsened histograms without noise: what
    the coarsening alone does."""
    return plan_from_fingerprint(
        reduce(Fingerprint.merge, [fp.coarsened() for fp in fingerprints])
    )


def fmt(values: Any) -> str:
    return " x ".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class PooledPlans:
    """The plans of the sites' cases pooled: moefl's exact, nnU-Net's, the
    noised ones per epsilon and the coarsened one."""

    fingerprints: list[Fingerprint]
    merged: Fingerprint
    exact: Plan
    reference: NnunetPlan
    dp: list[dict[str, Any]]
    coarse: Plan

    def summary(self) -> dict[str, Any]:
        return {
            "moefl": plan_row(self.exact),
            "moefl_fingerprint": self.merged.summary(),
            "nnunet": self.reference.summary(),
            "vs_nnunet": agreement(self.exact, self.reference),
            "moefl_coarsened": {
                **plan_row(self.coarse),
                "vs_nnunet": agreement(self.coarse, self.reference),
            },
        }


def pooled_plans(
    args: argparse.Namespace,
    configs: list[SiteConfig],
    log: Path,
    seconds: dict[str, float],
) -> PooledPlans:
    """moefl's plans of the merged fingerprints and nnU-Net's of the cases
    pooled (module docstring, steps 2 to 4), timed into ``seconds``."""
    t0 = time.perf_counter()
    fingerprints = [site_fingerprint(c) for c in configs]
    seconds["moefl_fingerprints"] = round(time.perf_counter() - t0, 1)
    merged = reduce(Fingerprint.merge, fingerprints)
    t0 = time.perf_counter()
    exact = plan_from_fingerprint(merged)
    seconds["moefl_plan"] = round(time.perf_counter() - t0, 3)

    with log.open("a") as f, contextlib.redirect_stdout(f):
        reference = nnunet_plan(
            configs, POOLED_ID, "PlanningPooled", num_processes=args.workers
        )
    seconds["nnunet_pooled"] = round(reference.seconds, 1)

    t0 = time.perf_counter()
    dp = [
        dp_plans(
            fingerprints,
            eps,
            args.delta,
            seeds=args.noise_seeds,
            tally=args.tally_seeds,
            reference=reference,
            exact=exact,
        )
        for eps in args.epsilons
    ]
    coarse = coarsened_plan(fingerprints)
    seconds["dp_plans"] = round(time.perf_counter() - t0, 1)
    return PooledPlans(fingerprints, merged, exact, reference, dp, coarse)


def plans_alone(
    args: argparse.Namespace,
    configs: list[SiteConfig],
    fingerprints: list[Fingerprint],
    log: Path,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Each site's plans from its own cases alone, timed into ``seconds``."""
    t0 = time.perf_counter()
    nnunet_seconds = 0.0
    sites: dict[str, Any] = {}
    for i, (config, fp) in enumerate(zip(configs, fingerprints, strict=True)):
        with log.open("a") as f, contextlib.redirect_stdout(f):
            alone = nnunet_plan(
                [config],
                POOLED_ID + 1 + i,
                f"Planning{config.site_name.title().replace('_', '')}",
                num_processes=args.workers,
            )
        nnunet_seconds += alone.seconds
        sites[config.site_name] = _site_alone(args, i, fp, alone)
    seconds["nnunet_sites"] = round(nnunet_seconds, 1)
    seconds["sites_moefl_and_dp"] = round(time.perf_counter() - t0 - nnunet_seconds, 1)
    return sites


def _site_alone(
    args: argparse.Namespace, i: int, fp: Fingerprint, alone: NnunetPlan
) -> dict[str, Any]:
    """Site ``i``'s exact, coarsened and noised plans against nnU-Net's."""
    plan = plan_from_fingerprint(fp)
    site_coarse = coarsened_plan([fp])
    return {
        "cases": fp.n_cases,
        "nnunet": alone.summary(),
        "moefl": plan_row(plan),
        "vs_nnunet": agreement(plan, alone),
        "moefl_coarsened": {
            **plan_row(site_coarse),
            "vs_nnunet": agreement(site_coarse, alone),
        },
        "dp": [
            dp_plans(
                [fp],
                eps,
                args.delta,
                seeds=0,
                tally=args.tally_seeds,
                reference=alone,
                exact=plan,
                site_index=i,
            )
            for eps in args.epsilons
        ],
    }
