"""The checkpoint folder, the one owner of its format, and durable writes.

A checkpoint is a folder of three files: ``model.safetensors`` (the weights;
never pickle, so a file from another party cannot run code when read),
``config.json`` (the model config under ``model``, and what trained it, e.g.
the experts' support, and the advice rule decided at the end of training
under ``advice_rule``) and ``plan.json`` (the preprocessing plan); a model
whose rule uses a posterior over its head has a fourth, ``advice.safetensors``
(:class:`shared_model.posterior.Posterior`). Every scorer reads the rule with
:func:`load_rule`. Local and
pooled training write it with :func:`save_checkpoint`; the coordinator's run
folder writes the same files (:func:`checkpoint_files`) at each round; every
reader goes through :func:`load_checkpoint`.
Every file is written durably (:mod:`shared_model.durable`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save
from safetensors.torch import load_file

from shared_model.clinical import REGIMENS
from shared_model.durable import json_bytes, write_atomic
from shared_model.errors import ConfigError
from shared_model.model import UNetMoECli, build_model
from shared_model.model_config import ModelConfig
from shared_model.plan import PLAN_FILE, Plan
from shared_model.policy import RecommendationRule
from shared_model.posterior import Posterior

MODEL, CONFIG, PLAN = "model.safetensors", "config.json", PLAN_FILE
ADVICE = "advice.safetensors"


def checkpoint_files(
    arrays: Mapping[str, np.ndarray],
    model_cfg: ModelConfig,
    plan: Plan,
    extra_config: Mapping[str, Any] | None = None,
    rule: RecommendationRule | None = None,
) -> dict[str, bytes]:
    """The checkpoint's files, name -> contents, weights first; with ``rule``,
    the advice rule in config.json and its posterior in ``advice.safetensors``."""
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    config = {"model": model_cfg.to_dict(), **(extra_config or {})}
    if rule is not None:
        config["advice_rule"] = rule.to_dict()
    out = {
        MODEL: save(tensors),
        CONFIG: json_bytes(config),
        PLAN: json_bytes(plan.to_dict()),
    }
    if rule is not None and rule.posterior is not None:
        out[ADVICE] = save(rule.posterior.to_arrays())
    return out


def load_rule(folder: Path) -> RecommendationRule | None:
    """The advice rule a checkpoint was decided with (None: an older
    checkpoint that records none; scorers then use the margin rule).
    ConfigError names the file when the record is unusable."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e
    raw = config.get("advice_rule") if isinstance(config, dict) else None
    if raw is None:
        return None
    posterior = None
    needed = isinstance(raw, dict) and raw.get("kind") == "switch"
    if needed or (Path(folder) / ADVICE).is_file():
        try:
            posterior = Posterior.from_arrays(
                load((Path(folder) / ADVICE).read_bytes())
            )
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{Path(folder) / ADVICE}: the posterior the advice rule needs is "
                f"missing or unusable ({e}); copy the checkpoint folder again"
            ) from e
    try:
        return RecommendationRule.from_dict(raw, posterior)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: `advice_rule` is invalid ({e})") from e


def save_checkpoint(
    model: UNetMoECli,
    out: Path,
    *,
    plan: Plan,
    extra_config: Mapping[str, Any] | None = None,
    rule: RecommendationRule | None = None,
) -> None:
    """Write ``model``'s checkpoint folder ``out`` (with its advice ``rule``)."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    for name, data in checkpoint_files(
        arrays, model.config, plan, extra_config, rule
    ).items():
        write_atomic(out / name, data)


def read_expert_support(folder: Path) -> dict[str, int] | None:
    """Per regimen, the patients that trained its expert, from a checkpoint's
    ``config.json`` (None when it does not say: every expert is then allowed)."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e
    support = config.get("expert_support") if isinstance(config, dict) else None
    if support is None:
        return None
    if not isinstance(support, dict) or not all(
        r in support
        and isinstance(support[r], int)
        and not isinstance(support[r], bool)
        and support[r] >= 0
        for r in REGIMENS
    ):
        raise ConfigError(
            f"{path}: `expert_support` must give a patient count for each of {REGIMENS}"
        )
    return {r: int(support[r]) for r in REGIMENS}


def load_checkpoint(folder: Path) -> tuple[UNetMoECli, Plan]:
    """Rebuild a model from a checkpoint folder (safetensors only, no pickle)."""
    folder = Path(folder)
    for name in (MODEL, CONFIG, PLAN):
        if not (folder / name).is_file():
            raise ConfigError(
                f"{folder}: {name} is missing; a checkpoint folder holds "
                f"{MODEL}, {CONFIG} and {PLAN}"
            )
    try:
        config = json.loads((folder / CONFIG).read_text())
        model_cfg = ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder / CONFIG}: invalid ({e})") from e
    plan = Plan.load(folder / PLAN)
    model = build_model(model_cfg)
    try:
        state = load_file(str(folder / MODEL))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # safetensors raises its own errors on a bad file
        raise ConfigError(
            f"{folder / MODEL}: cannot be read as weights for this model "
            f"({type(e).__name__}); the file may be truncated or from another "
            "model: copy the checkpoint again"
        ) from e
    if missing or unexpected:
        raise ConfigError(
            f"{folder / MODEL}: weights do not match the model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, plan
