"""Reading a site's nnU-Net raw dataset and clinical table, read-only.

A site folder follows nnU-Net v2's raw layout plus ``clinical.csv``::

    DatasetNNN_<Site>/
      dataset.json
      imagesTr/<case>_0000.nii.gz   T2W
      imagesTr/<case>_0001.nii.gz   ADC (same grid as T2W)
      labelsTr/<case>.nii.gz        tumour mask {0, 1}
      clinical.csv

The functions here only read (``clinical.csv`` in :mod:`client.data.clinical_table`).
:mod:`client.checks.preflight` turns what they find into a
report; :mod:`client.data.dataset` builds training samples from a checked site.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.data.clinical_table import read_clinical_table
from client.problem import Problem
from shared_model.clinical import CLINICAL_FEATURES, REGIMENS, ClinicalRecord
from shared_model.errors import DataError

CHANNELS: dict[str, str] = {"0": "T2", "1": "ADC"}
LABELS: dict[str, int] = {"background": 0, "tumour": 1}
FILE_ENDINGS = (".nii.gz", ".nii")


@dataclass
class DatasetScan:
    """Files found in ``imagesTr`` and ``labelsTr``, grouped by case id.

    ``refused``: image files left out, with the finding that says why (a
    symbolic link whose target is missing, or one that leads outside the
    dataset folder and the site's ``image_roots``).
    """

    channels: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)
    refused: list[Problem] = field(default_factory=list)

    def refused_case(self, case_id: str) -> bool:
        """Whether a file of ``case_id`` was refused (its finding names it)."""
        return any(p.case == case_id for p in self.refused)


@dataclass(frozen=True)
class CaseFiles:
    """One case's files and clinical record."""

    case_id: str
    t2: Path
    adc: Path
    label: Path | None
    clinical: ClinicalRecord

    def file_stats(self) -> list[tuple[str, int, int]]:
        """Each image file's path, size and modification time (ns): what a
        cache made from them is keyed on."""
        files = [self.t2, self.adc] + ([self.label] if self.label else [])
        out = []
        for p in files:
            st = Path(p).stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return out


def read_dataset_json(
    dataset_dir: Path,
) -> tuple[dict[str, object] | None, list[Problem]]:
    """Read and verify ``dataset.json`` (channels, labels, file ending, count)."""
    path = dataset_dir / "dataset.json"
    rel = "dataset.json"
    if not path.is_file():
        return None, [
            Problem(
                "dataset-json-missing",
                rel,
                "dataset.json is missing",
                "write it as in the site data format (site_configs/README.md)",
            )
        ]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [
            Problem(
                "dataset-json-invalid",
                rel,
                f"not valid JSON ({e})",
                "fix the JSON syntax",
            )
        ]
    if not isinstance(data, dict):
        return None, [
            Problem(
                "dataset-json-invalid",
                rel,
                "must be a JSON object",
                "see the site data format",
            )
        ]
    problems: list[Problem] = []
    expect = {"channel_names": CHANNELS, "labels": LABELS}
    for key, value in expect.items():
        if key not in data:
            problems.append(
                Problem(
                    "dataset-json-field",
                    f"{rel}:{key}",
                    f"`{key}` is missing",
                    f'add "{key}": {json.dumps(value)}',
                )
            )
        elif data[key] != value:
            problems.append(
                Problem(
                    "dataset-json-field",
                    f"{rel}:{key}",
                    f"`{key}` is {json.dumps(data[key])}; expected {json.dumps(value)}",
                    f'set "{key}": {json.dumps(value)} (channel 0 = T2W, channel 1 = ADC)',
                )
            )
    ending = data.get("file_ending")
    if ending not in FILE_ENDINGS:
        problems.append(
            Problem(
                "dataset-json-field",
                f"{rel}:file_ending",
                f"`file_ending` is {ending!r}; expected one of {FILE_ENDINGS}",
                'store NIfTI files and set "file_ending": ".nii.gz"',
            )
        )
    n = data.get("numTraining")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(
            Problem(
                "dataset-json-field",
                f"{rel}:numTraining",
                f"`numTraining` is {n!r}; expected a whole number",
                "set it to the number of cases in imagesTr",
            )
        )
    return data, problems


def scan_dataset(
    dataset_dir: Path, file_ending: str, image_roots: Sequence[Path] = ()
) -> DatasetScan:
    """Group the files of ``imagesTr``/``labelsTr`` by case id and channel.

    A file must resolve (symbolic links followed) inside ``dataset_dir`` or one
    of ``image_roots`` (the site YAML's ``image_roots``); a link that leads
    elsewhere, or nowhere, is refused with a finding (``scan.refused``), so a
    dataset folder cannot pull in files the site did not mean to share.
    """
    scan = DatasetScan()
    pattern = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(file_ending)}$")
    roots = [Path(dataset_dir).resolve(), *(Path(r).resolve() for r in image_roots)]
    images = dataset_dir / "imagesTr"
    if images.is_dir():
        for p in sorted(images.iterdir()):
            m = pattern.match(p.name)
            case = None if m is None else m["case"]
            if case is not None and _refused(p, dataset_dir, roots, case, scan):
                continue
            if m is None or not p.is_file():
                scan.stray.append(p)
                continue
            scan.channels.setdefault(m["case"], {})[int(m["ch"])] = p
    labels = dataset_dir / "labelsTr"
    if labels.is_dir():
        for p in sorted(labels.iterdir()):
            named = p.name.endswith(file_ending)
            case = p.name[: -len(file_ending)] if named else None
            if case is not None and _refused(p, dataset_dir, roots, case, scan):
                continue
            if p.is_file() and named:
                scan.labels[p.name[: -len(file_ending)]] = p
            else:
                scan.stray.append(p)
    return scan


def _refused(
    path: Path, dataset_dir: Path, roots: Sequence[Path], case: str, scan: DatasetScan
) -> bool:
    """Record (and return True) when ``path`` is a dangling link or resolves
    outside every allowed root."""
    rel = str(path.relative_to(dataset_dir))
    if path.is_symlink() and not path.exists():
        scan.refused.append(
            Problem(
                "dangling-link",
                rel,
                f"{rel} is a symbolic link to {os.readlink(path)}, which does not "
                "exist",
                "restore the target or replace the link with the file",
                case=case,
            )
        )
        return True
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in roots):
        scan.refused.append(
            Problem(
                "outside-dataset",
                rel,
                f"{rel} resolves to {target}, outside the dataset folder",
                "copy the file into the dataset folder, or name its folder under "
                "`image_roots` in the site YAML if the site means to use it",
                case=case,
            )
        )
        return True
    return False


def segmentation_records(case_ids: Iterable[str]) -> dict[str, ClinicalRecord]:
    """Placeholder clinical records for a public segmentation dataset (no
    clinical.csv): the first value of every variable, nCRT, outcome unknown.
    Only ``moefl pretrain`` reads such a site, and the backbone it trains never
    sees clinical data."""
    features = {k: values[0] for k, values in CLINICAL_FEATURES.items()}
    return {i: ClinicalRecord(i, dict(features), REGIMENS[0], None) for i in case_ids}


def list_cases(
    dataset_dir: Path,
    *,
    require_outcome: bool,
    clinical: bool = True,
    image_roots: Sequence[Path] = (),
) -> list[CaseFiles]:
    """The cases of a site that has passed ``moefl check``, sorted by case id.

    ``clinical=False``: a public segmentation dataset; its cases are those with
    both channels and a mask, with :func:`segmentation_records`.
    ``image_roots``: the site YAML's folders images may resolve into besides
    ``dataset_dir`` (a file resolving elsewhere is refused).

    Raises:
        DataError: the folder is inconsistent; run ``moefl check`` for a full report.
    """
    data, problems = read_dataset_json(dataset_dir)
    if data is None or problems:
        raise DataError(
            f"{dataset_dir}: {problems[0].where}: {problems[0].message}; "
            "run `moefl check` on the site YAML for a full report"
        )
    scan = scan_dataset(dataset_dir, str(data["file_ending"]), image_roots)
    if scan.refused:
        raise DataError(
            f"{dataset_dir}: {scan.refused[0].where}: {scan.refused[0].message}; "
            "run `moefl check` on the site YAML for a full report"
        )
    if not clinical:
        labelled = sorted(set(scan.channels) & set(scan.labels))
        records, problems = segmentation_records(labelled), []
    else:
        records, problems = read_clinical_table(
            dataset_dir / "clinical.csv", require_outcome=require_outcome
        )
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(
            f"{dataset_dir}: {errors[0].where}: {errors[0].message}; "
            "run `moefl check` on the site YAML for a full report"
        )
    cases = []
    for case_id in sorted(records):
        ch = scan.channels.get(case_id, {})
        if 0 not in ch or 1 not in ch:
            raise DataError(
                f"{dataset_dir}: case {case_id} lacks its T2W or ADC image; "
                "run `moefl check` for a full report"
            )
        cases.append(
            CaseFiles(case_id, ch[0], ch[1], scan.labels.get(case_id), records[case_id])
        )
    return cases
