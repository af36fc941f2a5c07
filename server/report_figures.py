"""The figures of ``moefl report``: training curves, federated validation by
round, ROC, calibration and decision curves, and disease-free survival by
advice, drawn from the run record and the evaluations (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.run_folder import account_epsilon
from shared_model.clinical import REGIMENS
from shared_model.federated_metrics import format_metric


def draw_figures(
    out: Path, run: dict[str, Any], evaluations: dict[str, Any]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")

    written = []
    rounds = run.get("rounds", [])
    if rounds:
        written.append(_training_figure(out, rounds))
        if privacy := _privacy_figure(out, rounds):
            written.append(privacy)
    for cohort, ev in evaluations.items():
        written.append(_evaluation_figure(out, cohort, ev))
        if ev.get("survival"):
            written.append(_survival_figure(out, cohort, ev["survival"]))
    return written


def _training_figure(out: Path, rounds: list[dict[str, Any]]) -> str:
    """Federated validation AUC and Dice, and the time of each round."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    evaluated = [r for r in rounds if "evaluate" in r]
    for key, style, label in (("auc", "o-", "AUC"), ("dice", "s-", "Dice")):
        ax[0].plot(
            [r["round"] for r in evaluated],
            [r["evaluate"].get(key) or float("nan") for r in evaluated],
            style,
            label=label,
        )
    ax[0].set(xlabel="round", title="federated validation", ylim=(0, 1))
    ax[0].legend()
    ax[1].plot(
        [r["round"] for r in rounds], [r.get("seconds", 0) for r in rounds], "o-"
    )
    ax[1].set(xlabel="round", ylabel="seconds", title="round time")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return "training.png"


def _privacy_figure(out: Path, rounds: list[dict[str, Any]]) -> str | None:
    """The DP-SGD epsilon each site spent by round; None when no site had one."""
    import matplotlib.pyplot as plt

    eps: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for site, m in {**r.get("sites", {}), **r.get("declined", {})}.items():
            if (epsilon := account_epsilon(m)) is not None:
                eps.setdefault(site, []).append((r["round"], epsilon))
    if not eps:
        return None
    fig, ax1 = plt.subplots(figsize=(5, 3.2))
    for site, pts in sorted(eps.items()):
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=site)
    ax1.set(xlabel="round", ylabel="epsilon spent", title="DP-SGD budget per site")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=110)
    plt.close(fig)
    return "privacy.png"


def _evaluation_figure(out: Path, cohort: str, ev: dict[str, Any]) -> str:
    """ROC (all and per regimen), calibration and decision curves of a cohort."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    _roc_panel(ax[0], cohort, ev)
    _calibration_panel(ax[1], ev["overall"]["calibration"] or {"bins": []})
    _decision_panel(ax[2], ev["decision_curve"])
    fig.tight_layout()
    name = f"evaluation_{cohort}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _roc_panel(axis: Any, cohort: str, ev: dict[str, Any]) -> None:
    roc = ev["overall"]["roc"]
    if roc["fpr"]:
        axis.plot(
            roc["fpr"],
            roc["tpr"],
            "k-",
            lw=2,
            label=f"all (AUC {format_metric(ev['auc'])})",
        )
    for r in REGIMENS:
        rr = ev["regimens"][r]["roc"]
        if rr["fpr"]:
            auc = ev["regimens"][r]["auc"]
            axis.plot(
                rr["fpr"],
                rr["tpr"],
                label=f"{r} (AUC {format_metric(auc and auc['auc'])})",
            )
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {cohort}")
    axis.legend(fontsize=8)


def _calibration_panel(axis: Any, cal: dict[str, Any]) -> None:
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.plot(
        [b["predicted"] for b in cal["bins"]],
        [b["observed"] for b in cal["bins"]],
        "o-",
    )
    axis.set(
        xlabel="predicted pCR",
        ylabel="observed pCR",
        title="calibration",
        xlim=(0, 1),
        ylim=(0, 1),
    )


def _decision_panel(axis: Any, dc: dict[str, Any]) -> None:
    axis.plot(dc["threshold"], dc["model"], label="model")
    axis.plot(dc["threshold"], dc["treat_all"], label="treat all as responders")
    axis.plot(dc["threshold"], dc["treat_none"], label="treat none")
    top = max(max(dc["model"] + dc["treat_all"]), 0.05)
    axis.set(
        xlabel="threshold probability",
        ylabel="net benefit",
        title="decision curve",
        ylim=(-0.05, top * 1.1),
    )
    axis.legend(fontsize=8)


def _survival_figure(out: Path, cohort: str, survival: dict[str, Any]) -> str:
    """Kaplan-Meier curves of DFS by recommendation direction and by whether
    the advised regimen was received (step functions from the event bins)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (
        (ax[0], ("escalate", "maintain", "de-intensify"), "logrank_directions"),
        (ax[1], ("followed", "not-followed"), "logrank_followed"),
    )
    for axis, groups, test in panels:
        for g in groups:
            km = survival["kaplan_meier"].get(g)
            if not km:
                continue
            end = km.get("max_follow_up") or 0.0
            axis.step(
                [0.0, *km["times"], end],
                [1.0, *km["survival"], (km["survival"] or [1.0])[-1]],
                where="post",
                label=f"{g} (n={km['n']})",
            )
        t = survival.get(test)
        p = "" if t is None else f", log-rank p = {t['p_value']:.3f}"
        axis.set(
            xlabel="months",
            ylabel="disease-free survival",
            ylim=(0, 1.02),
            title=f"DFS by advice, {cohort}{p}",
        )
        axis.legend(fontsize=8)
    fig.tight_layout()
    name = f"survival_{cohort}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
