"""A site's fingerprint (:class:`shared_model.fingerprint.Fingerprint`): each
case's T2W spacing and size, reoriented to RAS and ordered ``(D, H, W)`` as the
network sees it, and its intensity percentiles (T2W z-scored and ADC inside
the tumour mask, ADC over the image), binned before anything leaves the site.

A site with a ``privacy`` section releases it through the Gaussian mechanism
(:meth:`Fingerprint.noised`) at the ``fingerprint_epsilon`` of its budget, and
records the release in its privacy ledger before it leaves: a planned
federation then spends that much of the budget before its first round.
"""

from __future__ import annotations

import math
import secrets

import nibabel as nib
import numpy as np

from client.checks.volume_checks import MAX_VOXELS
from client.data.site_config import SiteConfig
from client.data.site_data import CaseFiles, list_cases
from client.privacy.site_privacy import SitePrivacy, noise_for
from shared_model.errors import DataError, PlanRefused
from shared_model.fingerprint import PERCENTILES, SENSITIVITY_ROWS, Fingerprint
from shared_model.messages import PrivacyAccount
from shared_model.plan import Plan


def _ras_geometry(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and size ``(D, H, W)`` = (S, A, R) of an image after reorientation."""
    ornt = nib.io_orientation(img.affine)  # source axis -> (RAS axis, flip)
    zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
    shape = np.asarray(img.shape[:3], np.float64)
    spacing, size = np.zeros(3), np.zeros(3)
    for source, (target, _) in enumerate(ornt):
        spacing[int(target)] = zooms[source]
        size[int(target)] = shape[source]
    return spacing[::-1], size[::-1]


def _percentiles(values: np.ndarray) -> np.ndarray:
    return np.percentile(values, PERCENTILES) if values.size else np.zeros(3)


def _intensities(case: CaseFiles, adc_scale: float) -> dict[str, np.ndarray]:
    """The case's intensity percentiles (:data:`PERCENTILES`)."""
    t2 = np.asarray(nib.load(str(case.t2)).dataobj, np.float64)  # type: ignore[attr-defined]
    adc = np.asarray(nib.load(str(case.adc)).dataobj, np.float64) * adc_scale  # type: ignore[attr-defined]
    out = {"adc_range": _percentiles(adc[adc != 0])}
    if case.label is not None:
        mask = np.asarray(nib.load(str(case.label)).dataobj) > 0  # type: ignore[attr-defined]
        body = t2[t2 != 0]
        z = (t2 - body.mean()) / max(float(body.std()), 1e-8)
        if mask.shape == t2.shape == adc.shape and mask.any():
            out["t2w"], out["adc"] = _percentiles(z[mask]), _percentiles(adc[mask])
    return out


def _site_cases(config: SiteConfig) -> list[CaseFiles]:
    """Every case of the site, with or without an outcome."""
    return list_cases(
        config.dataset_dir,
        require_outcome=False,
        clinical=config.role != "public",
        image_roots=config.image_roots,
    )


def site_fingerprint(config: SiteConfig, *, intensities: bool = True) -> Fingerprint:
    """The exact fingerprint of every case of a checked site (``intensities``
    False: the geometry alone, from the headers)."""
    cases = _site_cases(config)
    if not cases:
        raise DataError(f"{config.dataset_dir}: no case to fingerprint")
    spacings, sizes = [], []
    stats: dict[str, list[np.ndarray]] = {"t2w": [], "adc": [], "adc_range": []}
    for case in cases:
        img = nib.load(str(case.t2))
        assert isinstance(img, nib.Nifti1Image | nib.Nifti2Image)  # checked site
        spacing, size = _ras_geometry(img)
        spacings.append(spacing)
        sizes.append(size)
        if intensities:
            for name, values in _intensities(case, config.adc_scale).items():
                stats[name].append(values)
    return Fingerprint.of(
        np.array(spacings),
        np.array(sizes),
        {k: np.array(v).reshape(-1, 3) for k, v in stats.items()},
    )


def fingerprint_noise(epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """The noise multiplier of one release at ``epsilon`` (``privacy.fingerprint_epsilon``)."""
    return noise_for(epsilon, delta, accountant, "privacy.fingerprint_epsilon")


def released_fingerprint(
    config: SiteConfig, accountant: str = "rdp", *, seed: list[int] | None = None
) -> tuple[Fingerprint, PrivacyAccount | None]:
    """What the site sends: the exact fingerprint, or under its ``privacy``
    section the noised one, charged to its ledger first
    (:meth:`SitePrivacy.charge_release`). Returns it and the DP accounting
    (None without DP). ConfigError when the budget cannot pay. ``seed`` seeds
    the noise (simulation's ``dp-reproducible`` only)."""
    exact = site_fingerprint(config)
    privacy = SitePrivacy.of(config, accountant)
    if privacy is None:
        return exact, None
    budget = privacy.budget
    z = fingerprint_noise(budget.fingerprint_epsilon, budget.delta, accountant)
    sensitivity = math.sqrt(SENSITIVITY_ROWS)
    account = privacy.charge_release(z, sensitivity, exact.n_cases, "fingerprint")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    return exact.noised(z * sensitivity, rng), account


MAX_COARSENING = 4.0
"""A plan may resample a site's images at most this many times coarser than
their median spacing along an axis (beyond, a tumour a few centimetres across
is a handful of voxels)."""
MIN_RESAMPLED_SIDE = 4


def check_plan_usable(config: SiteConfig, plan: Plan) -> None:
    """Refuse a plan under which the site's data would be unusable
    (:class:`PlanRefused` says why: too coarse a spacing, images too small on
    its grid, or one too large to hold in memory)."""
    cases = _site_cases(config)
    if not cases:
        return
    geometry = [_ras_geometry(nib.load(str(c.t2))) for c in cases]  # type: ignore[arg-type]
    spacing = np.median([g[0] for g in geometry], axis=0)
    extent = np.array([g[0] * g[1] for g in geometry])
    target = np.asarray(plan.spacing)
    axes = ("D (slices)", "H", "W")
    for a, name in enumerate(axes):
        if target[a] > MAX_COARSENING * spacing[a]:
            raise PlanRefused(
                f"{config.site_name}: the plan's spacing {target[a]:g} mm along "
                f"{name} is over {MAX_COARSENING:g} times the site's median "
                f"{spacing[a]:g} mm; its images would lose most of their detail"
            )
    resampled = np.median(extent, axis=0) / target
    for a, name in enumerate(axes):
        if resampled[a] < MIN_RESAMPLED_SIDE:
            raise PlanRefused(
                f"{config.site_name}: at the plan's {target[a]:g} mm along {name} "
                f"the site's median image has {resampled[a]:.1f} voxels there "
                f"(under {MIN_RESAMPLED_SIDE})"
            )
    largest = int(np.argmax(np.prod(extent / target, axis=1)))
    voxels = float(np.prod(extent[largest] / target))
    if voxels > MAX_VOXELS:
        raise PlanRefused(
            f"{config.site_name}: at the plan's spacing {tuple(plan.spacing)} mm "
            f"case {cases[largest].case_id} would have {voxels:,.0f} voxels, above "
            f"the {MAX_VOXELS:,} a site holds in memory"
        )
