"""Preprocessed volumes on the site's own disk, paid for once.

Reading, reorienting, resampling and normalising a patient's NIfTI files is
most of what a deployed round costs when every message starts a fresh
process. The store keeps the result (``t2``, ``adc`` and the mask, each
``(1, D, H, W)`` on the plan's grid, padded to the patch) as one safetensors
file per patient (never pickle) under ``run_dir/preprocessed/<plan>/``. A file
is used only when its key matches: the plan, the ADC unit, the preprocessing
version and each source file's path, size and modification time; a stale file
is replaced, a corrupt one is rebuilt (with a warning), never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from client.data.site_data import CaseFiles
from shared_model.durable import write_atomic
from shared_model.plan import Plan

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever preprocessing changes what it produces."""


class VolumeStore:
    """One site's preprocessed volumes under one plan."""

    def __init__(self, root: Path, plan: Plan, adc_scale: float) -> None:
        self.plan, self.adc_scale = plan, adc_scale
        self.plan_key = json.dumps(plan.to_dict(), sort_keys=True)
        digest = hashlib.sha256(self.plan_key.encode()).hexdigest()
        self.folder = Path(root) / digest[:16]

    def path(self, case: CaseFiles) -> Path:
        return self.folder / f"{case.case_id}.safetensors"

    def key(self, case: CaseFiles) -> str:
        """What the stored file must have been made from."""
        blob = json.dumps([VERSION, self.plan_key, self.adc_scale, case.file_stats()])
        return hashlib.sha256(blob.encode()).hexdigest()

    def load(self, case: CaseFiles) -> dict[str, torch.Tensor] | None:
        """The stored volumes, or None when missing or stale (a corrupt file is
        removed with a warning, so it is rebuilt)."""
        path = self.path(case)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            volumes = load(data)
            stored_key = volumes.pop("__key__").numpy().tobytes().decode()
        except (OSError, SafetensorError, KeyError, UnicodeDecodeError) as e:
            log.warning("preprocessed %s is unreadable (%s); rebuilding it", path, e)
            path.unlink(missing_ok=True)
            return None
        if stored_key != self.key(case):
            return None  # the data or the plan changed: rebuild
        if set(volumes) - {"t2", "adc", "label"} or not all(
            v.ndim == 4 and torch.isfinite(v).all() for v in volumes.values()
        ):
            log.warning("preprocessed %s has wrong contents; rebuilding it", path)
            path.unlink(missing_ok=True)
            return None
        return volumes

    def save(self, case: CaseFiles, volumes: dict[str, torch.Tensor]) -> None:
        """Store ``volumes`` for ``case`` (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key = torch.frombuffer(bytearray(self.key(case).encode()), dtype=torch.uint8)
        tensors = {k: v.contiguous() for k, v in volumes.items()}
        write_atomic(self.path(case), save({**tensors, "__key__": key}))


class SegmentationStore:
    """A frozen backbone's predicted masks beside the volumes they came from
    (``<store>/segmented/<backbone sha256[:16]>/<case>.safetensors``): scoring
    under the same backbone (head rounds, repeated evaluation) segments each
    patient once, across processes. Keyed like the volumes plus the backbone;
    only the latest backbone's folder is kept; an unreadable file is removed."""

    def __init__(self, volumes: VolumeStore, backbone: str) -> None:
        self.volumes, self.backbone = volumes, backbone
        self.root = volumes.folder / "segmented"
        self.folder = self.root / backbone[:16]

    def _key(self, case: CaseFiles) -> str:
        return hashlib.sha256(
            (self.volumes.key(case) + self.backbone).encode()
        ).hexdigest()

    def load(self, case: CaseFiles) -> tuple[torch.Tensor, float | None] | None:
        path = self.folder / f"{case.case_id}.safetensors"
        if not path.is_file():
            return None
        try:
            stored = load(path.read_bytes())
            key = stored["__key__"].numpy().tobytes().decode()
            mask, dice = stored["mask"], float(stored["dice"])
        except (OSError, SafetensorError, KeyError, UnicodeDecodeError) as e:
            log.warning("segmentation %s is unreadable (%s); redoing it", path, e)
            path.unlink(missing_ok=True)
            return None
        if key != self._key(case) or mask.ndim != 3:
            return None
        return mask.long(), None if dice != dice else dice  # NaN: nothing to measure

    def save(self, case: CaseFiles, mask: torch.Tensor, dice: float | None) -> None:
        if not self.folder.is_dir() and self.root.is_dir():
            for old in self.root.iterdir():  # an earlier backbone's masks
                for f in old.glob("*"):
                    f.unlink(missing_ok=True)
                old.rmdir()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = torch.frombuffer(bytearray(self._key(case).encode()), dtype=torch.uint8)
        tensors = {
            "mask": mask.to(torch.uint8).contiguous(),
            "dice": torch.tensor(float("nan") if dice is None else dice),
            "__key__": key,
        }
        write_atomic(self.folder / f"{case.case_id}.safetensors", save(tensors))
