"""The plan: the spatial contract between data loading and the network.

Like nnU-Net's plans file, a plan is a small inspectable JSON artifact. It
fixes the voxel spacing that every case is resampled to and the patch the
network sees, both in ``(D, H, W)`` order: D runs along the slice axis
(inferior to superior after reorientation), H anterior-posterior, W
left-right.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

from shared_model.errors import ConfigError

MAX_PATCH_SIDE = 512
MAX_PATCH_VOXELS = 128 * 256 * 256
"""Upper bounds on a plan's patch (per axis and in all): far above any plan a
GPU trains, far below what would exhaust a site's memory when allocated."""

PLAN_FILE = "plan.json"
"""The plan's file: in a checkpoint folder, a run folder and a synthetic cohort."""


def plan_file(
    explicit: str | Path | None, cohort_dir: str | Path | None
) -> Path | None:
    """Where a run's plan comes from: ``explicit`` (a ``--plan`` or the run
    config's ``plan``) when given, else the cohort's :data:`PLAN_FILE` when it
    has one, else None (the caller falls back: a pretrained backbone's plan,
    the planning query, or the default plan). The one lookup of a plan on disk.
    """
    if explicit:
        return Path(explicit)
    if cohort_dir and (Path(cohort_dir) / PLAN_FILE).is_file():
        return Path(cohort_dir) / PLAN_FILE
    return None


def _real(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _whole(value: object) -> bool:
    return _real(value) and float(value).is_integer()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Plan:
    """Spatial plan shared by every site of a federation.

    Attributes:
        patch_size: network input size ``(D, H, W)`` in voxels.
        spacing: target voxel spacing ``(D, H, W)`` in millimetres.
        adc_clip: ADC range in 10^-3 mm^2/s that values are clipped to before
            scaling; ADC is a physical quantity, so it is not z-scored.
    """

    patch_size: tuple[int, int, int] = (16, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
    adc_clip: tuple[float, float] = (0.0, 3.5)

    def __post_init__(self) -> None:
        # A plan may come from the coordinator: every value is bounded here, so
        # a site never allocates for a 4096^3 patch or resamples to NaN mm.
        if (
            len(self.patch_size) != 3
            or not all(_whole(p) and 4 <= p <= MAX_PATCH_SIDE for p in self.patch_size)
            or math.prod(int(p) for p in self.patch_size) > MAX_PATCH_VOXELS
        ):
            raise ConfigError(
                f"plan `patch_size` must be three integers from 4 to {MAX_PATCH_SIDE} "
                f"with at most {MAX_PATCH_VOXELS} voxels in all, got {self.patch_size}"
            )
        if len(self.spacing) != 3 or not all(
            _real(s) and 0.05 <= float(s) <= 20.0 for s in self.spacing
        ):
            raise ConfigError(
                f"plan `spacing` must be three millimetre values from 0.05 to 20, "
                f"got {self.spacing}"
            )
        lo, hi = self.adc_clip
        if not (_real(lo) and _real(hi) and 0 <= lo < hi <= 10):
            raise ConfigError(
                "plan `adc_clip` must satisfy 0 <= low < high <= 10 (10^-3 mm^2/s), "
                f"got {self.adc_clip}"
            )
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "adc_clip", tuple(float(v) for v in self.adc_clip))

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object], *, source: str = "plan") -> Plan:
        unknown = set(data) - {"patch_size", "spacing", "adc_clip"}
        if unknown:
            raise ConfigError(f"{source}: unknown plan keys {sorted(unknown)}")
        try:
            return cls(**{k: tuple(v) for k, v in data.items()})  # type: ignore[arg-type]
        except TypeError as e:
            raise ConfigError(f"{source}: invalid plan ({e})") from e

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read plan ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a plan is a JSON object")
        return cls.from_dict(data, source=str(path))


PRESET_PLANS: dict[str, Plan] = {
    "tiny": Plan(patch_size=(8, 32, 32), spacing=(3.0, 2.5, 2.5)),
    "demo": Plan(patch_size=(16, 64, 64), spacing=(3.0, 1.5, 1.5)),
    "paper": Plan(patch_size=(24, 160, 160), spacing=(3.0, 0.7, 0.7)),
}
PRESET_PLANS["public"] = PRESET_PLANS["demo"]  # pretraining for demo federations
PRESET_PLANS["public-tiny"] = PRESET_PLANS["tiny"]
"""Default plan for each synthetic cohort preset (CPU-sized for tiny and demo)."""
PRESET_PLANS["paper-demo"] = PRESET_PLANS["demo"]  # the paper's counts, demo grid
