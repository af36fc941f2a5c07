"""The planning benchmark's table: every plan against nnU-Net's, the DP
tallies and what the run cost."""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.planning_plans import fmt


def planning_table(result: dict[str, Any]) -> str:
    """The benchmark's result as text: every plan against nnU-Net's, then the
    DP tallies and the cost."""
    lines = [
        f"planning: preset {result['preset']}, seed {result['seed']}, "
        f"{result['n_cases']} training cases, {result['images']} images",
        "",
        "| plan | cases | spacing (D x H x W mm) | patch (D x H x W) | vs nnU-Net: "
        "spacing diff % | patch diff (stride step) | within tolerance |",
        "|---|---|---|---|---|---|---|",
        *_plan_rows(result),
        "",
        *_tally_lines(result),
    ]
    t = result["seconds"]
    lines.append(
        "seconds: "
        + ", ".join(f"{k} {v}" for k, v in t.items())
        + f"; peak memory (sampled, all processes): PSS {result['peak_pss_mib']} "
        f"MiB, largest process {result['peak_process_mib']} MiB"
    )
    return "\n".join(lines)


def _row(name: str, cases: Any, plan: dict[str, Any], vs: dict[str, Any] | None) -> str:
    """One plan's table row, with its difference from nnU-Net's when given."""
    if vs is None:
        diff = ["-", "-", "-"]
    else:
        diff = [
            " / ".join(f"{100 * v:+.1f}" for v in vs["spacing_relative_difference"]),
            " / ".join(
                f"{d:+d} ({s})"
                for d, s in zip(vs["patch_difference"], vs["stride_step"], strict=True)
            ),
            "yes" if vs["within_tolerance"] else "**no**",
        ]
    return (
        f"| {name} | {cases} | {fmt(plan['spacing'])} | "
        f"{fmt(plan['patch_size'])} | {' | '.join(diff)} |"
    )


def _plan_rows(result: dict[str, Any]) -> list[str]:
    """The pooled plans (nnU-Net's, moefl's exact, coarsened and noised), then
    each site's alone."""
    pooled = result["pooled"]
    n = result["n_cases"]
    coarse = pooled["moefl_coarsened"]
    lines = [
        _row("nnU-Net 3d_fullres, pooled", n, pooled["nnunet"], None),
        _row("moefl, exact fingerprints", n, pooled["moefl"], pooled["vs_nnunet"]),
        _row(
            "moefl, DP-coarsened fingerprints, no noise",
            n,
            coarse,
            coarse["vs_nnunet"],
        ),
    ]
    for dp in result["dp"]:
        for r in dp["runs"]:
            if "error" in r:
                lines.append(
                    f"| moefl, epsilon {dp['epsilon']:g}, seed {r['seed']} | "
                    f"{r['n_cases_noised']} (noised) | failed: {r['error']} | | | | |"
                )
            else:
                lines.append(
                    _row(
                        f"moefl, epsilon {dp['epsilon']:g}, seed {r['seed']}",
                        f"{r['n_cases_noised']} (noised)",
                        r,
                        r.get("vs_nnunet"),
                    )
                )
    for site, s in result.get("sites", {}).items():
        coarse = s["moefl_coarsened"]
        lines += [
            _row(f"{site} alone: nnU-Net", s["cases"], s["nnunet"], None),
            _row(f"{site} alone: moefl", s["cases"], s["moefl"], s["vs_nnunet"]),
            _row(
                f"{site} alone: moefl, coarsened",
                s["cases"],
                coarse,
                coarse["vs_nnunet"],
            ),
        ]
    return lines


def _tally_lines(result: dict[str, Any]) -> list[str]:
    """How often the noised plans were within tolerance, pooled and per site."""
    lines = []
    for dp in result["dp"]:
        t = dp["tally"]
        lines.append(
            f"pooled, epsilon {dp['epsilon']:g} (noise multiplier "
            f"{dp['noise_multiplier']}, count std {dp['count_std']}): within "
            f"tolerance {dp['within_tolerance']} shown, {t['within_tolerance']}/"
            f"{t['seeds']} seeds; equal to the exact plan {t['equals_exact']}/"
            f"{t['seeds']}; plans {t['plans']}"
        )
    for site, s in result.get("sites", {}).items():
        for dp in s["dp"]:
            t = dp["tally"]
            lines.append(
                f"{site} alone, epsilon {dp['epsilon']:g}: within tolerance "
                f"{t['within_tolerance']}/{t['seeds']} seeds; plans {t['plans']}"
            )
    return lines
