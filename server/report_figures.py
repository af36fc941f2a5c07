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
    import matplotlib.pyplot as plt

    written = []
    rounds = run.get("rounds", [])
    if rounds:
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
        written.append("training.png")
        eps: dict[str, list[tuple[int, float]]] = {}
        for r in rounds:
            for site, m in {**r.get("sites", {}), **r.get("declined", {})}.items():
                if (epsilon := account_epsilon(m)) is not None:
                    eps.setdefault(site, []).append((r["round"], epsilon))
        if eps:
            fig, ax1 = plt.subplots(figsize=(5, 3.2))
            for site, pts in sorted(eps.items()):
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=site)
            ax1.set(
                xlabel="round", ylabel="epsilon spent", title="DP-SGD budget per site"
            )
            ax1.legend()
            fig.tight_layout()
            fig.savefig(out / "privacy.png", dpi=110)
            plt.close(fig)
            written.append("privacy.png")
    for cohort, ev in evaluations.items():
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
        roc = ev["overall"]["roc"]
        if roc["fpr"]:
            ax[0].plot(
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
                ax[0].plot(
                    rr["fpr"],
                    rr["tpr"],
                    label=f"{r} (AUC {format_metric(auc and auc['auc'])})",
                )
        ax[0].plot([0, 1], [0, 1], ":", color="grey")
        ax[0].set(
            xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {cohort}"
        )
        ax[0].legend(fontsize=8)
        cal = ev["overall"]["calibration"] or {"bins": []}
        ax[1].plot([0, 1], [0, 1], ":", color="grey")
        ax[1].plot(
            [b["predicted"] for b in cal["bins"]],
            [b["observed"] for b in cal["bins"]],
            "o-",
        )
        ax[1].set(
            xlabel="predicted pCR",
            ylabel="observed pCR",
            title="calibration",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        dc = ev["decision_curve"]
        ax[2].plot(dc["threshold"], dc["model"], label="model")
        ax[2].plot(dc["threshold"], dc["treat_all"], label="treat all as responders")
        ax[2].plot(dc["threshold"], dc["treat_none"], label="treat none")
        top = max(max(dc["model"] + dc["treat_all"]), 0.05)
        ax[2].set(
            xlabel="threshold probability",
            ylabel="net benefit",
            title="decision curve",
            ylim=(-0.05, top * 1.1),
        )
        ax[2].legend(fontsize=8)
        fig.tight_layout()
        name = f"evaluation_{cohort}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
        if ev.get("survival"):
            written.append(_survival_figure(out, cohort, ev["survival"]))
    return written


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
