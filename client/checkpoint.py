"""Checkpoint folders: ``model.safetensors`` (no pickle), ``plan.json`` and
``config.json`` (the model config, and what trained it: the experts' support)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from shared_model.clinical import REGIMENS
from shared_model.errors import ConfigError
from shared_model.model import ModelConfig, UNetMoECli, build_model
from shared_model.plan import Plan


def save_checkpoint(
    model: UNetMoECli,
    out: Path,
    *,
    plan: Plan,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write ``model.safetensors``, ``plan.json`` and ``config.json`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    plan.save(out / "plan.json")
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_expert_support(folder: Path) -> dict[str, int] | None:
    """Per regimen, the patients that trained its expert, from a checkpoint's
    ``config.json`` (None when it does not say: every expert is then allowed)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{Path(folder) / 'config.json'}: unreadable ({e})") from e
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
            f"{Path(folder) / 'config.json'}: `expert_support` must give a patient "
            f"count for each of {REGIMENS}"
        )
    return {r: int(support[r]) for r in REGIMENS}


def load_checkpoint(folder: Path) -> tuple[UNetMoECli, Plan]:
    """Rebuild a model from a checkpoint folder (safetensors only, no pickle)."""
    folder = Path(folder)
    for name in ("model.safetensors", "config.json", "plan.json"):
        if not (folder / name).is_file():
            raise ConfigError(
                f"{folder}: {name} is missing; a checkpoint folder holds "
                "model.safetensors, config.json and plan.json"
            )
    try:
        config = json.loads((folder / "config.json").read_text())
        model_cfg = ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: invalid ({e})") from e
    plan = Plan.load(folder / "plan.json")
    model = build_model(model_cfg)
    try:
        state = load_file(str(folder / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # safetensors raises its own errors on a bad file
        raise ConfigError(
            f"{folder / 'model.safetensors'}: cannot be read as weights for this "
            f"model ({type(e).__name__}); the file may be truncated or from another "
            "model: copy the checkpoint again"
        ) from e
    if missing or unexpected:
        raise ConfigError(
            f"{folder / 'model.safetensors'}: weights do not match the "
            f"model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, plan
