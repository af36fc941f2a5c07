"""The DP evaluation release's error: ``python -m simulations.benchmarks.evaluation_release``.

On the demo cohort's training sites (cohort generation is deterministic from
the seed), each site's validation split as ``moefl`` makes it. No trained model
is used: a stand-in model scores each validation patient with the synthetic
world's true pCR probability under the regimen received (the noise's effect
depends on the counts, not on the model). For each epsilon, the sites' score
histograms are released as a DP site would release them
(:meth:`SiteEvaluation.noised`) ``--draws`` times and the coordinator's AUC
(:func:`shared_model.noised_counts.widened_auc`) is compared with the exact one.
``--scale`` repeats the validation patients to show the size a target needs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from client.data.site_config import DEFAULT_VAL_FRACTION
from client.data.split import compute_split
from client.privacy.evaluation_release import evaluation_noise
from shared_model.clinical import REGIMENS
from shared_model.federated_metrics import ScoreCounts, auc_from_histograms
from shared_model.noised_counts import RELEASE_SENSITIVITY, widened_auc
from shared_model.policy_value import PolicySums
from shared_model.site_evaluation import SiteEvaluation
from simulations.benchmarks.common import machine, write_json
from simulations.cohort import build_cohort
from simulations.sites import PRESETS


def validation_sites(preset: str, seed: int, scale: int) -> list[SiteEvaluation]:
    """Each training site's exact evaluation of its validation split, every
    patient counted ``scale`` times, scored with the true pCR probability."""
    world = build_cohort(PRESETS[preset], seed)
    out = []
    for site in sorted({p.site for p in world.retrospective}):
        members = [p for p in world.retrospective if p.site == site]
        cases = [
            SimpleNamespace(
                case_id=p.case_id,
                clinical=SimpleNamespace(regimen=p.regimen, pcr=p.pcr),
            )
            for p in members
        ]
        split = compute_split(cases, val_fraction=DEFAULT_VAL_FRACTION, seed=0)  # type: ignore[arg-type]
        val = [p for p in members if p.case_id in set(split.val)]
        counts = {}
        for j, r in enumerate(REGIMENS):
            group = [p for p in val if p.regimen == r]
            c = ScoreCounts.from_scores(
                [p.prob[j] for p in group], [p.pcr for p in group]
            )
            counts[r] = ScoreCounts(c.pos * scale, c.neg * scale)
        out.append(SiteEvaluation(site, "validation", counts, 0.0, 0, PolicySums()))
    return out


def released_errors(
    sites: list[SiteEvaluation], epsilon: float, delta: float, draws: int
) -> dict[str, Any]:
    """The released AUC's error over ``draws`` releases at ``epsilon``."""
    pooled = sum((c for s in sites for c in s.counts.values()), ScoreCounts.empty())
    exact = auc_from_histograms(pooled.pos, pooled.neg)
    std = evaluation_noise(epsilon, delta) * RELEASE_SENSITIVITY
    rng = np.random.default_rng(0)
    aucs, widened = [], None
    for k in range(draws):
        released = sum(
            (c for s in sites for c in s.noised(std, epsilon, rng).counts.values()),
            ScoreCounts.empty(),
        )
        w = widened_auc(
            released, len(REGIMENS) * len(sites) * std**2, draws=0 if k else 400
        )
        aucs.append(np.nan if w is None else w["auc"])
        widened = widened or w
    err = np.abs(np.asarray(aucs) - exact)
    return {
        "epsilon": epsilon,
        "noise_std": std,
        "exact_auc": exact,
        "released_mean": float(np.nanmean(aucs)),
        "mae": float(np.nanmean(err)),
        "p95": float(np.nanpercentile(err, 95)),
        "undefined": int(np.isnan(err).sum()),
        "first_release": widened,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--scale", type=int, nargs="*", default=[1, 10, 25])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    t0 = time.process_time()
    print(
        "stand-in model: each validation patient's true pCR probability under the "
        "regimen received (no trained model; the noise's effect depends on the "
        f"counts). delta {args.delta:g}, {args.draws} releases per row, "
        f"sensitivity {RELEASE_SENSITIVITY:.3f}"
    )
    for scale in args.scale:
        sites = validation_sites(args.preset, args.seed, scale)
        n = sum(c.n for s in sites for c in s.counts.values())
        label = f"{args.preset} validation" + (f" x{scale}" if scale > 1 else "")
        print(f"\n{label}: {n} patients over {len(sites)} sites")
        for eps in (0.5, 1.0, 2.0):
            r = released_errors(sites, eps, args.delta, args.draws)
            rows.append({"scale": scale, "patients": n, "sites": len(sites), **r})
            w = r["first_release"]
            ci = (
                "n/a"
                if w is None
                else f"{w['auc']:.3f} ({w['ci'][0]:.3f}-{w['ci'][1]:.3f})"
            )
            print(
                f"  epsilon {eps:>3g}: noise std {r['noise_std']:5.2f}  exact AUC "
                f"{r['exact_auc']:.3f}  released mean {r['released_mean']:.3f}  "
                f"|error| mean {r['mae']:.3f}, 95th pct {r['p95']:.3f}"
                f"{'  undefined ' + str(r['undefined']) if r['undefined'] else ''}  "
                f"one release's widened 95% CI {ci}"
            )
    print(f"\nCPU {time.process_time() - t0:.0f} s")
    if args.json:
        write_json(args.json, {"machine": machine(), "result": rows})


if __name__ == "__main__":
    main()
