"""``moefl report RUN_DIR``: report.md and report.html with PNG figures.

Reads only records, each through its owner: the federated run's record
(:func:`server.run_folder.read_run_record`: rounds, privacy,
per-round federated validation), the evaluation written by ``moefl evaluate
... --out RUN_DIR/evaluation`` when present
(:func:`shared_model.site_evaluation.read_evaluation`), and the evaluations of
comparators given as ``NAME=FOLDER``. Every number shown is in those files.
The report is built as a list of blocks rendered twice, to Markdown and HTML.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from server.report_blocks import Block, cohort_blocks, format_ci
from server.report_figures import draw_figures
from server.run_folder import RUN_RECORD, privacy_spent, read_run_record
from shared_model.federated_metrics import format_metric
from shared_model.site_evaluation import COHORTS, EVALUATION, read_evaluation


def _number(value: Any) -> str:
    """A record's number in its shortest form, ``n/a`` when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:g}"


def build_report(
    run_dir: Path, comparators: dict[str, Path] | None = None
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the figures into ``run_dir``."""
    run_dir = Path(run_dir)
    run = read_run_record(run_dir)
    run_path = run_dir / RUN_RECORD
    eval_path = run_dir / "evaluation" / EVALUATION
    evaluation = read_evaluation(eval_path.parent) if eval_path.is_file() else {}
    cohorts: dict[str, Any] = {c: evaluation[c] for c in COHORTS if c in evaluation}
    figures = set(draw_figures(run_dir, run, cohorts))

    rounds = [r for r in run.get("rounds", []) if isinstance(r, dict)]
    blocks = [Block("h1", f"moefl report: {run_dir.name}")]
    blocks.append(
        Block(
            "p",
            f"Federated run status: {run.get('status')}, {len(rounds)} rounds. Sources: "
            f"{run_path}"
            + (
                f" and {eval_path}"
                if evaluation
                else " (no evaluation yet: "
                f"run `moefl evaluate {run_dir} --sites ... --out {run_dir}/evaluation`)"
            )
            + ".",
        )
    )
    blocks.extend(_training_blocks(rounds, figures))
    blocks.extend(_privacy_blocks(run, rounds))
    if cohorts:
        blocks.extend(_evaluation_blocks(evaluation, cohorts))
    comparison = evaluation.get("comparison")
    if comparison:
        blocks.extend(_comparison_blocks(comparison))
    if comparators:
        entries = {
            "this run": evaluation,
            **{k: read_evaluation(Path(v)) for k, v in comparators.items()},
        }
        blocks.extend(_comparator_blocks(entries))

    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(_markdown(blocks))
    html_path.write_text(_html(blocks))
    return md_path, html_path


def _training_blocks(rounds: list[dict[str, Any]], figures: set[str]) -> list[Block]:
    """Each round's sites and federated validation, and the training figure."""
    blocks = [Block("h2", "Training")]
    rows = [
        ["round", "sites", "excluded", "declined", "val AUC", "val Dice", "seconds"]
    ]
    for r in rounds:
        ev = r.get("evaluate", {})
        # DP sites that withhold their validation counts, when no site sent any
        withheld = "withheld (DP)" if ev.get("withheld") and not ev.get("n") else ""
        rows.append(
            [
                str(r.get("round", "?")),
                ", ".join(sorted(r.get("sites", {}))) or "-",
                ", ".join(sorted(r.get("excluded", {}))) or "-",
                ", ".join(sorted(r.get("declined", {}))) or "-",
                withheld or format_metric(ev.get("auc")),
                withheld or format_metric(ev.get("dice")),
                format_metric(r.get("seconds"), 0),
            ]
        )
    blocks.append(Block("table", rows=rows))
    if "training.png" in figures:
        blocks.append(Block("image", "training.png"))
    return blocks


def _privacy_blocks(run: dict[str, Any], rounds: list[dict[str, Any]]) -> list[Block]:
    """The DP-SGD budget each site spent, and the client-level DP account."""
    blocks = [Block("h2", "Privacy spent")]
    spent = privacy_spent(run)
    if spent:
        rows = [["site", "epsilon spent", "target", "delta", "noise", "clip"]]
        for site, p in sorted(spent.items()):
            rows.append(
                [
                    site,
                    format_metric(p.get("epsilon")),
                    _number(p.get("target_epsilon")),
                    _number(p.get("delta")),
                    format_metric(p.get("noise_multiplier")),
                    _number(p.get("max_grad_norm")),
                ]
            )
        blocks.append(Block("table", rows=rows))
        blocks.append(Block("image", "privacy.png"))
    else:
        blocks.append(Block("p", "No site trained under DP-SGD in this run."))
    central = next(
        (r["client_dp"] for r in reversed(rounds) if r.get("client_dp")), None
    )
    if central:
        blocks.append(
            Block(
                "p",
                f"Client-level DP: epsilon {format_metric(central.get('epsilon'))} at "
                f"delta {_number(central.get('delta'))} after "
                f"{_number(central.get('releases'))} rounds (noise "
                f"{_number(central.get('noise_multiplier'))}, clip "
                f"{_number(central.get('clip'))}).",
            )
        )
    return blocks


def _evaluation_blocks(
    evaluation: dict[str, Any], cohorts: dict[str, Any]
) -> list[Block]:
    """The advice rule in words, then each evaluated cohort's blocks."""
    rule = evaluation.get("rule") or {}
    what_if = " (a what-if, not the checkpoint's rule)" if "what_if" in rule else ""
    blocks = [
        Block("h2", "Evaluation"),
        Block(
            "p",
            f"Advice rule{what_if}: {rule.get('in_words', 'not recorded')}. "
            "Metrics are computed from the sites' counts and sums; no per-patient "
            "score left a site.",
        ),
    ]
    for cohort, ev in cohorts.items():
        blocks.extend(cohort_blocks(cohort, ev))
    return blocks


def _comparison_blocks(comparison: dict[str, Any]) -> list[Block]:
    """The paired McNemar comparison against another model."""
    rows = [
        [
            "cohort",
            "operating point",
            "only this model right",
            "only the other right",
            "McNemar p (exact)",
        ]
    ]
    for cohort, points in comparison["mcnemar"].items():
        for name, m in points.items():
            rows.append(
                [
                    cohort,
                    name,
                    str(m["b"]),
                    str(m["c"]),
                    format_metric(m["p_value"]),
                ]
            )
    return [
        Block("h3", f"Paired comparison against {comparison['against']}"),
        Block("table", rows=rows),
    ]


def _comparator_blocks(entries: dict[str, dict[str, Any]]) -> list[Block]:
    """One row per model and cohort: this run's evaluation beside the others'."""
    rows = [
        [
            "model",
            "cohort",
            "AUC (95% CI)",
            "sens @0.5",
            "spec @0.5",
            "sens @target",
            "spec @target",
            "Brier",
            "doubly robust pCR",
        ]
    ]
    for name, ev_all in entries.items():
        for cohort in COHORTS:
            ev = ev_all.get(cohort)
            if not ev:
                continue
            ops = list(ev["overall"]["operating_points"].values())
            sens = [format_metric(op["sensitivity"]["value"]) for op in ops] + [
                "n/a"
            ] * (2 - len(ops))
            spec = [format_metric(op["specificity"]["value"]) for op in ops] + [
                "n/a"
            ] * (2 - len(ops))
            rows.append(
                [
                    name,
                    cohort,
                    format_ci(ev["overall"]["auc"], "auc"),
                    sens[0],
                    spec[0],
                    sens[1],
                    spec[1],
                    format_metric(ev["overall"]["brier"]),
                    format_ci(ev["policy_value"].get("dr")),
                ]
            )
    return [Block("h2", "Comparators"), Block("table", rows=rows)]


def _markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.text})")
        elif b.kind == "table" and b.rows:
            out.append("| " + " | ".join(b.rows[0]) + " |")
            out.append("|" + "---|" * len(b.rows[0]))
            out.extend("| " + " | ".join(r) + " |" for r in b.rows[1:])
        out.append("")
    return "\n".join(out)


def _html(blocks: list[Block]) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "image":
            body.append(
                f'<p><img src="{html.escape(b.text)}" alt="{html.escape(b.text)}"></p>'
            )
        elif b.kind == "table" and b.rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.rows[0])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                for r in b.rows[1:]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>moefl report</title>"
        f"<style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
