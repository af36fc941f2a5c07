"""``moefl simulate``: the whole federation on one machine (Flower simulation).

Makes the synthetic cohort if it is missing, runs one simulated SuperNode per
retrospective site with Flower's simulation runtime (Ray), and checks the run's
own status afterwards: Flower may log a failure and carry on, so success is
read from ``metrics.json``, never assumed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from client.data.site_config import load_site_config, write_site_yaml
from client.node.site_state import simulation_site_yamls
from server.identity import NodeSites
from server.run_folder import RUN_RECORD, read_run_record
from shared_model.errors import MoeflError
from shared_model.federated_metrics import format_metric
from shared_model.federation_config import FederationConfig
from shared_model.layout import COHORT_RECORD, site_yamls

log = logging.getLogger(__name__)

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower() -> None:
    """No outbound calls from Flower: telemetry, update check, dependency install.

    Also keeps Flower's and Ray's console output to warnings.
    """
    os.environ.update(FLOWER_ENV)
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def write_private_sites(
    yamls: list[Path], folder: Path, privacy: Mapping[str, float]
) -> Path:
    """Copies of the cohort's site YAMLs with a ``privacy`` section.

    Each copy keeps its dataset (absolute path) and gets its own ``run_dir``
    under ``folder``, so the sites' privacy ledgers belong to this run: a
    fresh run starts with the whole budget, a resumed one continues its
    ledger. Returns ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for path in yamls:
        raw = yaml.safe_load(path.read_text())
        raw["dataset_dir"] = str((path.parent / raw["dataset_dir"]).resolve())
        raw["run_dir"] = str((folder / raw["site_name"]).resolve())
        raw["privacy"] = dict(privacy)
        write_site_yaml(folder / path.name, raw, comment=f"{path} with a DP budget")
    return folder


def run_simulated_federation(
    out: Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    privacy: Mapping[str, float] | None = None,
    echo: Callable[[str], None] = lambda s: None,
    client_app: Any = None,
) -> dict[str, Any]:
    """Run a simulated federation; return its run record.

    Args:
        out: folder holding ``cohort/`` (made if missing) and ``federated/`` (the run).
        preset: synthetic cohort preset when the cohort must be made.
        seed: cohort seed and federation seed (unless overridden).
        overrides: run config keys (kebab-case), e.g. ``{"num-server-rounds": 5}``.
        privacy: ``{"target_epsilon", "delta", "max_grad_norm"}``: every site
            trains with DP-SGD under that budget (site YAML copies under
            ``federated/sites/``; see :func:`write_private_sites`).
        echo: progress lines.
        client_app: the sites' ClientApp (default: moefl's own;
            :func:`simulations.hostile.scaling_client_app` plays an attacker).

    Raises:
        MoeflError: the run did not finish (the reason is in metrics.json).
    """
    out = Path(out)
    cohort = out / "cohort"
    yamls = _cohort_site_yamls(cohort, preset, seed, echo)
    config: dict[str, Any] = {
        "cohort-dir": str(cohort.resolve()),
        "run-dir": str((out / "federated").resolve()),
        "seed": seed,
        "min-sites": len(yamls),
        "dp-reproducible": True,
        **dict(overrides or {}),
    }
    if privacy is not None:
        _make_sites_private(config, yamls, privacy, echo)
    fed = FederationConfig.from_run_config(config)  # fail early on a bad key
    echo(_plan_in_words(fed, yamls))
    run_flower_simulation(config, len(yamls), client_app)
    return _finished_record(fed)


def _cohort_site_yamls(
    cohort: Path, preset: str, seed: int, echo: Callable[[str], None]
) -> list[Path]:
    """The cohort's site YAMLs, making the cohort first when it is missing."""
    from simulations.synth import synthesize

    summary_path = cohort / COHORT_RECORD
    if not summary_path.is_file():
        echo(f"making the {preset} cohort in {cohort} ...")
        synthesize(cohort, preset=preset, seed=seed, force=True)
    yamls = site_yamls(cohort)
    if not yamls:
        raise MoeflError(
            f"{cohort}/site_configs holds no site YAML; remove {cohort} to "
            "regenerate the cohort"
        )
    return yamls


def _make_sites_private(
    config: dict[str, Any],
    yamls: list[Path],
    privacy: Mapping[str, float],
    echo: Callable[[str], None],
) -> None:
    """Set ``config`` up for every site training with DP-SGD under ``privacy``."""
    # DP sites train the heads over a pretrained public backbone (staged),
    # or everything with DP-SGD (joint); never heads over a backbone the
    # federation trained on their patients.
    training = str(
        config.setdefault("training", "staged" if config.get("backbone") else "joint")
    )
    if training == "staged" and not config.get("backbone"):
        raise MoeflError(
            "DP sites join a staged federation only over a pretrained public "
            "backbone: give run config `backbone` (from `moefl pretrain`), or "
            '`training = "joint"`'
        )
    if training == "staged":
        # the head DP-SGD can train at a site's size, in rounds: DP sites
        # release no exact Newton sums (README, Privacy)
        config.setdefault("head-type", "linear")
        config.setdefault("head-fit", "rounds")
    sites = Path(str(config["run-dir"])) / "sites"
    config["sites-dir"] = str(write_private_sites(yamls, sites, privacy))
    echo(
        f"every site trains with DP-SGD: target epsilon "
        f"{privacy['target_epsilon']:g}, delta {privacy['delta']:g}, clip "
        f"{privacy['max_grad_norm']:g} (site YAMLs and ledgers in {sites})"
    )


def _plan_in_words(fed: FederationConfig, yamls: list[Path]) -> str:
    return (
        f"simulating {len(yamls)} sites ({', '.join(p.stem for p in yamls)}), "
        + (
            f"{fed.segmentation_rounds} segmentation rounds, then the heads' Newton "
            "fit and the advice rule"
            if fed.fits_posterior
            else f"{fed.segmentation_rounds} segmentation + {fed.head_rounds} head rounds"
            if fed.training == "staged"
            else f"{fed.num_server_rounds} rounds (joint)"
        )
        + f", strategy {fed.strategy}; run folder {fed.run_dir}"
    )


def _finished_record(fed: FederationConfig) -> dict[str, Any]:
    """The run record, or why the run did not finish."""
    metrics = Path(fed.run_dir) / RUN_RECORD
    if not metrics.is_file():
        raise MoeflError(f"the simulation wrote no {metrics}; see the log above")
    record = read_run_record(Path(fed.run_dir))
    if record.get("status") != "finished":
        raise MoeflError(
            f"the federated run did not finish (status "
            f"{record.get('status')!r}: {record.get('error', 'no error recorded')}); "
            f"see {metrics}"
        )
    return record


def simulated_node_sites(config: Mapping[str, Any], n_sites: int) -> NodeSites:
    """The simulation's own map of its nodes to sites, for the ServerApp.

    Flower's simulation creates its nodes one by one, node i serving partition
    i, and its in-memory link state keeps them in that order; partition i
    reads the i-th site YAML (:func:`client.node.site_state.simulation_site_yamls`).
    So node i is that YAML's site, whatever its replies claim.
    """
    fed = FederationConfig.from_run_config(config)
    folder, yamls = simulation_site_yamls(fed)
    names = [load_site_config(p).site_name for p in yamls[:n_sites]]
    if len(names) != n_sites:
        raise MoeflError(f"{folder} holds {len(yamls)} site YAMLs, not {n_sites}")

    def node_sites(grid: Any) -> dict[int, str]:
        state = getattr(grid, "state", None)
        if state is None:
            raise MoeflError(
                "the simulation's node map needs Flower's in-memory grid; run "
                "the ServerApp with `moefl simulate`"
            )
        nodes = [n.node_id for n in state.get_node_info()]
        if len(nodes) != len(names):
            raise MoeflError(
                f"the simulation has {len(nodes)} nodes for {len(names)} sites"
            )
        return dict(zip(nodes, names, strict=True))

    return node_sites


def run_flower_simulation(
    config: Mapping[str, Any], n_sites: int, client_app: Any = None
) -> None:
    """Run the ServerApp with run config ``config`` and ``n_sites`` simulated
    ClientApps in Flower's simulation runtime (the server's log lines shown,
    Flower's quiet). The ServerApp knows which node is which site from the
    simulation itself (:func:`simulated_node_sites`)."""
    quiet_flower()
    from flwr.simulation import run_simulation

    from client.node.client_app import app as moefl_client_app
    from server.server_app import make_server_app

    node_sites = simulated_node_sites(config, n_sites)

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    notice = _RunSimulationNotice()
    flwr_logger.addFilter(notice)
    server_logger = logging.getLogger("server")
    server_logger.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    server_logger.addHandler(handler)
    propagate, server_logger.propagate = server_logger.propagate, False
    try:
        run_simulation(
            server_app=make_server_app(config, simulation=True, node_sites=node_sites),
            client_app=client_app or moefl_client_app,
            num_supernodes=n_sites,
            backend_config={
                "client_resources": {
                    "num_cpus": max(1, os.cpu_count() or 1),
                    "num_gpus": 0.0,
                },
                "init_args": {
                    "logging_level": logging.ERROR,
                    "log_to_driver": False,
                    "include_dashboard": False,
                },
            },
        )
    finally:
        flwr_logger.removeFilter(notice)
        server_logger.removeHandler(handler)
        server_logger.propagate = propagate


def format_run_summary(record: dict[str, Any]) -> str:
    """Final summary of a federated run record."""
    rounds = record["rounds"]
    last = rounds[-1] if rounds else {}
    advice = record.get("advice") or {}
    ev: dict[str, Any] = advice.get("evaluate") or next(
        (r["evaluate"] for r in reversed(rounds) if "evaluate" in r), {}
    )
    lines = [f"federated run {record['status']}: {len(rounds)} rounds"]
    if advice:
        fit = advice["fit"]
        lines.append(
            f"  heads: pooled logistic regression by {fit['newton_steps']} Newton "
            f"steps over {len(fit['sites'])} sites (prior {fit['lam']:g}, chosen on "
            f"the validation log-loss); advice: {advice['rule_in_words']}"
        )
    if ev:
        by = ", ".join(
            f"{k} {format_metric(v)}" for k, v in ev.get("auc_by_regimen", {}).items()
        )
        lines.append(
            f"  validation ({ev.get('n')} patients): AUC {format_metric(ev.get('auc'))} "
            f"({by}), Dice {format_metric(ev.get('dice'))}"
        )
        overall = ev.get("overall") or {}
        for name, op in (overall.get("operating_points") or {}).items():
            lines.append(
                f"    threshold {name} = {op['threshold']:.3f}: sensitivity "
                f"{format_metric(op['sensitivity']['value'])}, specificity "
                f"{format_metric(op['specificity']['value'])}"
            )
        pv = ev.get("policy_value") or {}
        if pv.get("dr"):
            lines.append(
                f"    pCR under the recommendations: doubly robust {pv['dr']['value']:.3f} "
                f"({pv['dr']['ci'][0]:.3f}-{pv['dr']['ci'][1]:.3f}), the model's own "
                f"estimate {pv['model_estimate']['value']:.3f} (circular), observed "
                f"{pv['observed']['value']:.3f}"
            )
    for site, m in sorted(last.get("sites", {}).items()):
        lines.append(
            f"  {site}: n-shared {m['n-shared']}, n-nCRT {m['n-nCRT']}, "
            f"n-TNT {m['n-TNT']}, n-nCT {m['n-nCT']}, up {_size(m['bytes_up'])}"
        )
    from server.run_folder import privacy_spent

    spent = privacy_spent(record)
    for site, p in sorted(spent.items()):
        lines.append(
            f"  {site}: DP-SGD epsilon {p['epsilon']:.3f} of {p['target_epsilon']:g} "
            f"(delta {p['delta']:g}, noise {p.get('noise_multiplier', float('nan')):.3f},"
            f" clip {p['max_grad_norm']:g}, rounds trained {p['rounds_trained']})"
        )
    central = next(
        (r["client_dp"] for r in reversed(rounds) if r.get("client_dp")), None
    )
    if central:
        lines.append(
            f"  client-level DP: epsilon {central['epsilon']:.3f} at delta "
            f"{central['delta']:g} (noise {central['noise_multiplier']:g}, clip "
            f"{central['clip']:g}, {central['releases']} releases)"
        )
    return "\n".join(lines)


def _size(n: float) -> str:
    """Bytes as kB below a megabyte, else MB."""
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: moefl calls it
    on purpose (in-process, with its own ServerApp object), and the notice gives
    whoever runs ``make demo`` nothing to act on. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("DEPRECATED FEATURE" in message and "run_simulation" in message)
