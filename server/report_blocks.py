"""The report's building blocks, and the blocks of one evaluated cohort
(metrics with intervals, per regimen and per site, operating points,
recommendations, policy value and survival by advice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared_model.clinical import REGIMENS
from shared_model.federated_metrics import format_metric, format_share


@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "image"
    text: str = ""
    rows: list[list[str]] | None = None  # first row: header


def format_ci(d: dict[str, Any] | None, key: str = "value") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    ci = d.get("ci")
    return f"{d[key]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def cohort_blocks(cohort: str, ev: dict[str, Any]) -> list[Block]:
    pv = ev["policy_value"]
    return [
        Block(
            "h3",
            f"{cohort.capitalize()} cohort ({ev['n']} patients with a known outcome)",
        ),
        _metrics_table(ev),
        *_operating_point_blocks(ev),
        _regimen_table(ev),
        _site_table(ev),
        Block("h3", f"Recommendations and their value, {cohort}"),
        _recommendation_table(pv),
        _policy_value_table(pv),
        *_policy_notes(pv),
        Block("image", f"evaluation_{cohort}.png"),
        *_survival_blocks(cohort, ev),
    ]


def _metrics_table(ev: dict[str, Any]) -> Block:
    """Discrimination, calibration and segmentation of the whole cohort."""
    o = ev["overall"]
    cal = o["calibration"] or {}
    return Block(
        "table",
        rows=[
            [
                "AUC (95% CI, DeLong)",
                "Brier",
                "ECE",
                "calibration slope",
                "intercept",
                "Dice",
            ],
            [
                format_ci(o["auc"], "auc"),
                format_metric(o["brier"]),
                format_metric(cal.get("ece")),
                format_metric(cal.get("slope")),
                format_metric(cal.get("intercept")),
                format_metric(ev.get("dice")),
            ],
        ],
    )


def _operating_point_blocks(ev: dict[str, Any]) -> list[Block]:
    """The thresholds with their Wilson intervals, and where the threshold came from."""
    rows = [
        ["threshold", "value", "sensitivity", "specificity", "PPV", "NPV", "accuracy"]
    ]
    for name, op in ev["overall"]["operating_points"].items():
        rows.append(
            [name, f"{op['threshold']:.3f}"]
            + [
                format_ci(op[k])
                for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")
            ]
        )
    chosen = ev.get("threshold_chosen_on") or "no cohort (no responder in validation)"
    return [
        Block(
            "p",
            "Operating points (95% Wilson intervals). The target-sensitivity "
            f"threshold was chosen on {chosen}.",
        ),
        Block("table", rows=rows),
    ]


def _regimen_table(ev: dict[str, Any]) -> Block:
    rows = [["regimen", "n", "pCR", "AUC (95% CI)", "Brier"]]
    for r in REGIMENS:
        g = ev["regimens"][r]
        rows.append(
            [
                r,
                str(g["n"]),
                str(g["n_pcr"]),
                format_ci(g["auc"], "auc"),
                format_metric(g["brier"]),
            ]
        )
    return Block("table", rows=rows)


def _site_table(ev: dict[str, Any]) -> Block:
    rows = [["site", "n", "AUC (95% CI)", "Dice", "doubly robust pCR under advice"]]
    for site, s in ev["sites"].items():
        rows.append(
            [
                site,
                str(s["n"]),
                format_ci(s["auc"], "auc"),
                format_metric(s.get("dice")),
                format_ci(s["policy_value"].get("dr")),
            ]
        )
    return Block("table", rows=rows)


def _recommendation_table(pv: dict[str, Any]) -> Block:
    """How many patients each direction and each regimen was advised for."""
    return Block(
        "table",
        rows=[
            [
                "escalate",
                "maintain",
                "de-intensify",
                *[f"recommended {r}" for r in REGIMENS],
            ],
            [str(pv["directions"][k]) for k in ("escalate", "maintain", "de-intensify")]
            + [str(pv["recommended"][r]) for r in REGIMENS],
        ],
    )


def _policy_value_table(pv: dict[str, Any]) -> Block:
    """The pCR rate as treated and under the advice, by each estimator."""
    rows = [["pCR rate", "estimate (95% CI)", "what it is"]]
    rows.append(
        [
            "current practice (observed)",
            format_ci(pv.get("observed")),
            "the outcomes as treated",
        ]
    )
    rows.append(
        [
            "under the advice, IPW",
            format_ci(pv.get("ipw")),
            "off-policy, site propensity models",
        ]
    )
    rows.append(
        [
            "under the advice, doubly robust",
            format_ci(pv.get("dr")),
            "off-policy, the honest estimate",
        ]
    )
    if pv.get("oracle"):
        truth = pv["oracle"]
        share = truth.get("share_of_oracle_gain")
        best = truth.get("best_fixed_regimen")
        rows.append(
            [
                "under the advice, true (oracle)",
                format_metric(truth["value"]),
                "simulation only: the cohort's potential outcomes; share of the "
                f"oracle's gain ({format_metric(truth.get('optimal'))}) over all "
                f"{best} ({format_metric((truth.get('fixed') or {}).get(best))})"
                f": {format_share(share)}",
            ]
        )
    rows.append(
        [
            "under the advice, the model's own estimate",
            format_ci(pv.get("model_estimate")),
            "circular: the model grading its own advice; not evidence",
        ]
    )
    return Block("table", rows=rows)


def _policy_notes(pv: dict[str, Any]) -> list[Block]:
    """Positivity warnings and the confidence behind the advice."""
    blocks = [Block("p", f"Warning: {w}.") for w in pv["positivity"]["warnings"]]
    if pv.get("confidence"):
        conf = pv["confidence"]
        blocks.append(
            Block(
                "p",
                "Confidence behind the advice: patients by the posterior probability "
                "that the likeliest better regimen beats the reference: "
                + ", ".join(f"{k}: {v}" for k, v in conf.items())
                + ".",
            )
        )
    return blocks


def _survival_blocks(cohort: str, ev: dict[str, Any]) -> list[Block]:
    """Disease-free survival by advice, with why it is no evidence."""
    if not ev.get("survival"):
        return []
    km = ev["survival"]["kaplan_meier"]
    truth = ev["policy_value"].get("oracle")
    return [
        Block(
            "p",
            "Disease-free survival by advice (Kaplan-Meier from the sites' "
            "counts of events and numbers at risk per month): 3-year DFS "
            + ", ".join(
                f"{g} {format_metric(k['dfs_3y'], 2)} (n={k['n']})"
                for g, k in km.items()
            )
            + ". This comparison is confounded: who received the advised "
            "regimen was not random (sites chose by stage and risk), so a "
            "difference between followed and not followed, and its log-rank p, "
            "is not evidence that the advice works."
            + (
                ""
                if not truth
                else " In this simulation the advice's true value is known: "
                f"mean true pCR {format_metric(truth.get('value'))}, "
                f"{format_share(truth.get('share_of_oracle_gain'))} of the "
                "oracle's gain over the best fixed regimen."
            ),
        ),
        Block("image", f"survival_{cohort}.png"),
    ]
