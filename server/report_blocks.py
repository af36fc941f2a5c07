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
    o = ev["overall"]
    blocks = [
        Block(
            "h3",
            f"{cohort.capitalize()} cohort ({ev['n']} patients with a known outcome)",
        )
    ]
    cal = o["calibration"] or {}
    blocks.append(
        Block(
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
    )
    rows = [
        ["threshold", "value", "sensitivity", "specificity", "PPV", "NPV", "accuracy"]
    ]
    for name, op in o["operating_points"].items():
        rows.append(
            [name, f"{op['threshold']:.3f}"]
            + [
                format_ci(op[k])
                for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")
            ]
        )
    chosen = ev.get("threshold_chosen_on") or "no cohort (no responder in validation)"
    blocks.append(
        Block(
            "p",
            "Operating points (95% Wilson intervals). The target-sensitivity "
            f"threshold was chosen on {chosen}.",
        )
    )
    blocks.append(Block("table", rows=rows))
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
    blocks.append(Block("table", rows=rows))
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
    blocks.append(Block("table", rows=rows))
    pv = ev["policy_value"]
    blocks.append(Block("h3", f"Recommendations and their value, {cohort}"))
    blocks.append(
        Block(
            "table",
            rows=[
                [
                    "escalate",
                    "maintain",
                    "de-intensify",
                    *[f"recommended {r}" for r in REGIMENS],
                ],
                [
                    str(pv["directions"][k])
                    for k in ("escalate", "maintain", "de-intensify")
                ]
                + [str(pv["recommended"][r]) for r in REGIMENS],
            ],
        )
    )
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
    blocks.append(Block("table", rows=rows))
    for w in pv["positivity"]["warnings"]:
        blocks.append(Block("p", f"Warning: {w}."))
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
    blocks.append(Block("image", f"evaluation_{cohort}.png"))
    if ev.get("survival"):
        km = ev["survival"]["kaplan_meier"]
        truth = pv.get("oracle")
        blocks.append(
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
            )
        )
        blocks.append(Block("image", f"survival_{cohort}.png"))
    return blocks
