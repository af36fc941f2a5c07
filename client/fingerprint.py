"""A site's fingerprint (:class:`shared_model.fingerprint.Fingerprint`): the
spacing and size of each case's T2W image, reoriented to RAS and ordered
``(D, H, W)`` as the network sees it, read from the NIfTI headers alone and
binned before anything leaves the site."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from client.site_config import SiteConfig
from client.site_data import list_cases
from shared_model.errors import DataError
from shared_model.fingerprint import Fingerprint


def site_fingerprint(config: SiteConfig) -> Fingerprint:
    """The fingerprint of every case of a checked site."""
    cases = list_cases(
        config.dataset_dir,
        require_outcome=False,
        clinical=config.role != "public",
    )
    if not cases:
        raise DataError(f"{config.dataset_dir}: no case to fingerprint")
    spacings, sizes = [], []
    for case in cases:
        img = nib.load(str(case.t2))
        assert isinstance(img, nib.Nifti1Image | nib.Nifti2Image)  # checked site
        ornt = nib.io_orientation(img.affine)  # source axis -> (RAS axis, flip)
        zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
        shape = np.asarray(img.shape[:3], np.float64)
        ras_spacing, ras_size = np.zeros(3), np.zeros(3)
        for source, (target, _) in enumerate(ornt):
            ras_spacing[int(target)] = zooms[source]
            ras_size[int(target)] = shape[source]
        spacings.append(ras_spacing[::-1])  # (S, A, R) = (D, H, W)
        sizes.append(ras_size[::-1])
    return Fingerprint.of(np.array(spacings), np.array(sizes))
