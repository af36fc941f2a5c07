"""Public T2W + ADC data for pretraining the backbone (``moefl import-msd``).

The Medical Segmentation Decathlon's prostate task (Task05_Prostate) is a public
dataset with both channels our model reads: ``imagesTr/<case>.nii.gz`` holds
4-D volumes whose last axis is the channel, named in ``dataset.json``'s
``modality`` (``{"0": "T2", "1": "ADC"}``), and ``labelsTr/<case>.nii.gz`` the
prostate zones (1 peripheral, 2 transition). :func:`import_msd` turns such a
task into a site folder of the nnU-Net v2 raw layout that moefl reads
(``<case>_0000`` T2W, ``<case>_0001`` ADC, the same grid; the mask is every
labelled voxel, as one foreground) plus a site YAML with ``role: public``: a
public segmentation dataset without clinical data, which ``moefl check`` checks
and ``moefl pretrain`` trains on. nnU-Net's own ``nnUNetv2_convert_MSD_dataset``
splits the channels the same way.

The ADC unit is read from the data: MSD stores ADC in 10^-6 mm^2/s; the YAML
records whichever unit the values show (99th percentile above 50: 10^-6).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.data.site_config import write_site_yaml
from shared_model.errors import ConfigError, DataError
from shared_model.federation_config import is_site_name

log = logging.getLogger(__name__)

_CASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class Imported:
    """What :func:`import_msd` wrote and what it left out."""

    site_yaml: Path
    dataset_dir: Path
    cases: list[str]
    adc_unit: str
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why


def _channels(meta: dict[str, Any], path: Path) -> tuple[int, int]:
    """Indices of T2 and ADC in an MSD ``modality`` mapping."""
    modality = meta.get("modality")
    if not isinstance(modality, dict):
        raise ConfigError(f"{path}: no `modality` mapping; is this an MSD task?")
    names = {str(v).strip().upper(): int(k) for k, v in modality.items()}
    t2 = next((i for n, i in names.items() if n.startswith("T2")), None)
    adc = names.get("ADC")
    if t2 is None or adc is None:
        raise ConfigError(
            f"{path}: modality {modality} lacks T2 or ADC; moefl pretrains on T2W "
            "and ADC (e.g. Task05_Prostate)"
        )
    return t2, adc


def _nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise ValueError(f"{path.name} is not a NIfTI-1 image")
    return img


def _adc_unit(p99: list[float]) -> str:
    return "1e-6" if p99 and float(np.median(p99)) > 50.0 else "1e-3"


def import_msd(
    task_dir: Path, out: Path, *, site_name: str = "msd_prostate"
) -> Imported:
    """Convert an MSD task with T2 and ADC into a public site under ``out``.

    Writes ``out/<site_name>/`` (``dataset.json``, ``imagesTr``, ``labelsTr``)
    and ``out/<site_name>.yaml``. A case whose files cannot be read or do not
    hold both channels is skipped and named in the result; the task itself is
    only read.
    """
    if not is_site_name(site_name):
        raise ConfigError(
            f"site name {site_name!r}: lower-case letters, digits and _, starting "
            "with a letter"
        )
    task_dir, out = Path(task_dir), Path(out)
    meta, t2, adc, entries = _read_task(task_dir)
    dataset = out / site_name
    if dataset.exists() and any(dataset.iterdir()):
        raise ConfigError(f"{dataset} is not empty; choose another --out")
    (dataset / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset / "labelsTr").mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    skipped: dict[str, str] = {}
    p99: list[float] = []
    for entry in entries:
        image_rel = str(entry.get("image", "")) if isinstance(entry, dict) else ""
        label_rel = str(entry.get("label", "")) if isinstance(entry, dict) else ""
        case = Path(image_rel).name.removesuffix(".gz").removesuffix(".nii")
        if not _CASE.match(case):
            skipped[str(entry)] = "no usable image name"
            continue
        try:
            image, data, label, mask = _read_case(
                task_dir / image_rel, task_dir / label_rel, max(t2, adc)
            )
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as e:
            skipped[case] = str(e)
            log.warning("skipping MSD case %s: %s", case, e)
            continue
        p99.extend(_write_case(dataset, case, image, data, label, mask, t2, adc))
        done.append(case)
    if not done:
        raise DataError(f"{task_dir}: no case could be imported ({skipped})")
    _write_dataset_json(dataset, meta, task_dir, len(done))
    unit = _adc_unit(p99)
    site_yaml = out / f"{site_name}.yaml"
    write_site_yaml(
        site_yaml,
        {
            "site_name": site_name,
            "role": "public",
            "dataset_dir": site_name,
            "adc_unit": unit,
            "run_dir": f"runs/{site_name}",
            "min_cases": min(10, len(done)),
        },
        comment=f"public segmentation data imported from {task_dir.name}; for "
        "moefl pretrain",
    )
    return Imported(site_yaml, dataset, done, unit, skipped)


def _read_task(task_dir: Path) -> tuple[dict[str, Any], int, int, list[Any]]:
    """The task's ``dataset.json``, its T2 and ADC channel indices and its
    training entries."""
    meta_path = task_dir / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta_path}: cannot read it ({e})") from e
    t2, adc = _channels(meta, meta_path)
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{meta_path}: no `training` cases listed")
    return meta, t2, adc, entries


def _read_case(
    image_path: Path, label_path: Path, max_channel: int
) -> tuple[nib.Nifti1Image, Any, nib.Nifti1Image, Any]:
    """A case's 4-D image and its mask, with their voxels; a ValueError when
    the channels or the mask's shape do not fit."""
    image = _nifti(image_path)
    data = np.asanyarray(image.dataobj)
    if data.ndim != 4 or data.shape[3] <= max_channel:
        raise ValueError(f"shape {data.shape}, expected 4-D with the channels last")
    label = _nifti(label_path)
    mask = np.asanyarray(label.dataobj)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} is not the image's {data.shape[:3]}")
    return image, data, label, mask


def _write_case(
    dataset: Path,
    case: str,
    image: nib.Nifti1Image,
    data: Any,
    label: nib.Nifti1Image,
    mask: Any,
    t2: int,
    adc: int,
) -> list[float]:
    """Write the case's T2W and ADC channels and its one-foreground mask;
    returns the 99th percentile of its positive ADC values (none if empty)."""
    affine, header = image.affine, image.header
    for channel, index in ((0, t2), (1, adc)):
        volume = np.asarray(data[..., index], dtype=np.float32)
        img = nib.Nifti1Image(volume, affine)
        img.header.set_zooms(header.get_zooms()[:3])
        nib.save(img, str(dataset / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
    adc_values = np.asarray(data[..., adc], dtype=np.float64)
    positive = adc_values[adc_values > 0]
    p99 = [float(np.percentile(positive, 99))] if positive.size else []
    nib.save(
        nib.Nifti1Image((mask > 0).astype(np.uint8), label.affine),
        str(dataset / "labelsTr" / f"{case}.nii.gz"),
    )
    return p99


def _write_dataset_json(
    dataset: Path, meta: dict[str, Any], task_dir: Path, n_cases: int
) -> None:
    """The nnU-Net v2 ``dataset.json`` of the imported site."""
    (dataset / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T2", "1": "ADC"},
                "labels": {"background": 0, "tumour": 1},
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
                "name": f"{meta.get('name', task_dir.name)} (moefl public import)",
                "source": str(meta.get("reference", meta.get("name", task_dir.name))),
            },
            indent=2,
        )
        + "\n"
    )
