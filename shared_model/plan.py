"""The plan: the spatial contract between data loading and the network.

Like nnU-Net's plans file, a plan is a small inspectable JSON artifact. It
fixes the voxel spacing that every case is resampled to and the patch the
network sees, both in ``(D, H, W)`` order: D runs along the slice axis
(inferior to superior after reorientation), H anterior-posterior, W
left-right.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from shared_model.errors import ConfigError


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
        if len(self.patch_size) != 3 or any(int(p) < 4 for p in self.patch_size):
            raise ConfigError(
                f"plan `patch_size` must be three integers >= 4, got {self.patch_size}"
            )
        if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
            raise ConfigError(
                f"plan `spacing` must be three positive millimetre values, "
                f"got {self.spacing}"
            )
        lo, hi = self.adc_clip
        if not 0 <= lo < hi:
            raise ConfigError(
                f"plan `adc_clip` must satisfy 0 <= low < high, got {self.adc_clip}"
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
"""Default plan for each synthetic cohort preset (CPU-sized for tiny and demo)."""
