"""The model's parameters by aggregation group (``shared`` and one expert per
regimen), and what each training stage trains."""

from __future__ import annotations

from torch import nn

from shared_model.clinical import REGIMENS
from shared_model.messages import GROUPS, SHARED, expert_group


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Map each aggregation group to its parameter names.

    ``expert/<regimen>`` holds the parameters of that regimen's expert MLP;
    ``shared`` everything else (backbone, modality encoders). Every parameter
    is in exactly one group. Works on a model wrapped by opacus too (the
    ``_module.`` prefix is ignored when classifying).
    """
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        bare = name.removeprefix("_module.")
        for r in REGIMENS:
            if bare.startswith(f"experts.{r}."):
                groups[expert_group(r)].append(name)
                break
        else:
            groups[SHARED].append(name)
    return groups


def is_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to the pCR part (not the segmenter)."""
    return not name.removeprefix("_module.").startswith("backbone.")


def stage_parameter_groups(model: nn.Module, stage: str) -> dict[str, list[str]]:
    """:func:`parameter_groups` restricted to what a round of ``stage`` trains.

    ``joint``: everything; ``segmentation``: the backbone only (the shared group;
    the experts' groups are empty); ``heads``: everything but the backbone, so
    the backbone a site's feature cache was computed with stays bit-identical.
    """
    groups = parameter_groups(model)
    if stage == "joint":
        return groups
    if stage == "segmentation":
        return {
            g: [n for n in names if not is_head_parameter(n)] if g == SHARED else []
            for g, names in groups.items()
        }
    if stage == "heads":
        return {
            g: [n for n in names if is_head_parameter(n)] for g, names in groups.items()
        }
    raise ValueError(f"unknown stage {stage!r}")
