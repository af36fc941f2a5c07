"""The evaluation's key numbers as text (``moefl evaluate`` and the demo)."""

from __future__ import annotations

from typing import Any

from shared_model.federated_metrics import format_share
from shared_model.site_evaluation import COHORTS


def headline(report: dict[str, Any]) -> str:
    """The evaluation's key numbers, one cohort per block."""
    rule = report.get("rule", {})
    lines = []
    if rule.get("in_words"):
        what_if = " (a what-if, not the checkpoint's rule)" if "what_if" in rule else ""
        lines.append(f"advice rule{what_if}: {rule['in_words']}")
    lines += [
        f"{regimen} is never recommended: {why}"
        for regimen, why in rule.get("not_recommended", {}).items()
    ]
    if "allowed" in rule and not rule["allowed"]:
        lines.append(
            "no regimen may be recommended, so advice is withheld: the policy "
            "figures below are those of current practice"
        )
    for cohort in COHORTS:
        if cohort not in report:
            continue
        r = report[cohort]
        auc = r["overall"]["auc"]
        auc_txt = (
            "n/a"
            if auc is None
            else f"{auc['auc']:.3f} ({auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})"
        )
        brier = r["overall"]["brier"]
        lines.append(
            f"{cohort} ({r['n']} patients with a known outcome): AUC {auc_txt}, "
            f"Brier {'n/a' if brier is None else f'{brier:.3f}'}"
        )
        for name, op in r["overall"]["operating_points"].items():
            sens, spec = op["sensitivity"]["value"], op["specificity"]["value"]
            lines.append(
                f"  threshold {name} = {op['threshold']:.3f}: sensitivity "
                f"{_pct(sens)}, specificity {_pct(spec)}, PPV {_pct(op['ppv']['value'])}, "
                f"NPV {_pct(op['npv']['value'])}"
            )
        pv = r["policy_value"]
        parts = []
        for k in ("observed", "ipw", "dr", "model_estimate", "oracle"):
            v = pv.get(k)
            if v:
                ci = v.get("ci")
                parts.append(
                    f"{k} {v['value']:.3f}"
                    + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                )
        lines.append("  pCR rate under the recommendations: " + ", ".join(parts))
        if pv.get("oracle"):
            lines.append("  " + oracle_line(pv["oracle"]))
            learnable = (report.get("learnable_share") or {}).get(cohort)
            if learnable:
                lines.append(
                    "  learnable share (per-regimen regressions on the world's "
                    "noise-free readouts, switch at q): "
                    + ", ".join(f"q {q}: {v}" for q, v in learnable.items())
                )
        if pv.get("confidence"):
            lines.append(
                "  confidence behind the advice (likeliest better regimen beats the "
                "reference with probability): "
                + ", ".join(f"{k} {v}" for k, v in pv["confidence"].items())
            )
        if r.get("survival"):
            lines.append("  " + survival_line(r["survival"]))
        lines.append(
            "  recommendations: "
            + ", ".join(f"{k} {v}" for k, v in pv["directions"].items())
        )
        for w in pv["positivity"]["warnings"]:
            lines.append(f"  warning: {w}")
        comparison = report.get("comparison", {})
        for name, m in comparison.get("mcnemar", {}).get(cohort, {}).items():
            lines.append(
                f"  against {comparison['against']} at {name}: only this model right "
                f"{m['b']}, only the other {m['c']}, McNemar p = {m['p_value']:.3f}"
            )
    return "\n".join(lines)


def oracle_line(truth: dict[str, Any]) -> str:
    """The true value of the advice against the fixed regimens and the oracle,
    and its share of the oracle's gain (simulation only)."""
    fixed = ", ".join(f"all {r} {v:.3f}" for r, v in truth["fixed"].items())
    share = truth["share_of_oracle_gain"]
    share_txt = (
        "n/a (the oracle gains nothing over a fixed regimen)"
        if share is None
        else format_share(share)
    )
    return (
        f"true pCR (oracle): advice {truth['value']:.3f}, {fixed}, oracle "
        f"{truth['optimal']:.3f}; share of the oracle's gain over all "
        f"{truth['best_fixed_regimen']}: {share_txt}"
    )


def survival_line(survival: dict[str, Any]) -> str:
    """3-year DFS per advice group and the log-rank p-values."""
    parts = []
    for group, km in survival["kaplan_meier"].items():
        v = km["dfs_3y"]
        parts.append(f"{group} {'n/a' if v is None else f'{v:.2f}'} (n={km['n']})")
    tests = []
    for key, name in (
        ("logrank_directions", "directions"),
        ("logrank_followed", "followed vs not"),
    ):
        t = survival.get(key)
        if t is not None:
            tests.append(f"{name} p = {t['p_value']:.3f}")
    return (
        "3-year DFS by advice: "
        + ", ".join(parts)
        + ("; log-rank " + ", ".join(tests) if tests else "")
    )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
