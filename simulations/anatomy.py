"""One patient's pelvic anatomy in millimetres: the rectum's course, wall and
fascia, the tumour (extent, depth, protrusion, EMVI, necrotic core), lymph
nodes; drawn from the patient's stage and latents (:func:`draw_anatomy`) and
imaged by :mod:`simulations.phantom`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from simulations.cohort import Patient


@dataclass(frozen=True)
class Anatomy:
    """Per-patient anatomical parameters drawn from the patient's latents."""

    curve_amp: float
    curve_phase: float
    lumen_r: float
    wall_r: float
    fascia_rx: float
    fascia_ry: float
    lumen_fluid: bool
    tumour_z0: float
    tumour_len: float
    tumour_theta0: float
    tumour_halfwidth: float
    protrusion: float
    extension: float
    emvi: bool
    emvi_theta: float
    nodes: tuple[tuple[float, float, float, float], ...]  # x, y, z, radius
    lln: tuple[float, float, float, float] | None
    core_depth: float = np.inf  # tumour depth above which tissue is necrotic core


def draw_anatomy(patient: Patient, rng: np.random.Generator) -> Anatomy:
    """Turn the patient's stage and latents into tumour and organ geometry.

    Volume: the tumour's length and angular width grow with the size latent so
    that the mask volume tracks ``exp(log_volume_ml)``. Stage: cT2 stays inside
    the wall, cT3 extends into the mesorectal fat, cT4 crosses the fascia; a
    threatened CRM puts the tumour edge within 1 mm of the fascia.
    """
    c = patient.clinical
    location_scale = {"low": 0.8, "mid": 1.0, "high": 1.1}[c["location"]]
    lumen_r = float(rng.uniform(5.0, 9.0))
    wall_r = lumen_r + float(rng.uniform(3.0, 4.0))
    fascia_rx = float(rng.uniform(30.0, 36.0)) * location_scale
    fascia_ry = max(fascia_rx * float(rng.uniform(0.75, 0.85)), wall_r + 6.0)
    fascia_rx = max(fascia_rx, fascia_ry)
    margin_to_fascia = min(fascia_rx, fascia_ry) - wall_r
    extension = _extension(c, margin_to_fascia, rng)
    volume_ml = float(np.exp(patient.log_volume_ml))
    # Cross-section of a wall sector ~ halfwidth * ((wall_r+ext)^2 - (lumen_r-prot)^2)
    protrusion = float(
        np.clip(rng.uniform(2.0, 6.0) * (1 + 0.3 * patient.size), 1.0, 9.0)
    )
    r_in = max(lumen_r - protrusion, 1.0)
    r_out = wall_r + max(extension, 0.0) * 0.6
    tumour_len = float(
        np.clip(20.0 + 10.0 * patient.size + rng.normal(0, 4), 12.0, 60.0)
    )
    area_needed = volume_ml * 1000.0 / tumour_len / (2 / 3)  # ellipsoidal taper
    halfwidth = float(np.clip(area_needed / max(r_out**2 - r_in**2, 1.0), 0.5, np.pi))
    nodes = _nodes(c["cN"], wall_r, min(fascia_rx, fascia_ry), rng)
    lln = _lateral_node(fascia_rx, rng) if c["LLN"] == "1" else None
    return Anatomy(
        curve_amp=float(rng.uniform(1.0, 4.0)),
        curve_phase=float(rng.uniform(0, 2 * np.pi)),
        lumen_r=lumen_r,
        wall_r=wall_r,
        fascia_rx=fascia_rx,
        fascia_ry=fascia_ry,
        lumen_fluid=bool(rng.random() < 0.4),
        tumour_z0=float(rng.normal(0, 3)),
        tumour_len=tumour_len,
        tumour_theta0=float(rng.uniform(0, 2 * np.pi)),
        tumour_halfwidth=halfwidth,
        protrusion=protrusion,
        extension=extension,
        emvi=c["EMVI"] == "1",
        emvi_theta=float(rng.uniform(-0.5, 0.5)),
        nodes=tuple(nodes),
        lln=lln,
    )


def _extension(
    clinical: dict[str, str], margin_to_fascia: float, rng: np.random.Generator
) -> float:
    """How far (mm) the tumour reaches beyond the wall, by cT and CRM."""
    if clinical["cT"] == "T2":
        return -float(rng.uniform(0.5, 1.5))
    if clinical["cT"] == "T4":
        return margin_to_fascia + float(rng.uniform(2.0, 6.0))
    if clinical["CRM"] == "1":
        return margin_to_fascia - float(rng.uniform(0.0, 1.0))
    return float(rng.uniform(1.5, max(2.0, margin_to_fascia - 3.0)))


def _nodes(
    cn: str, wall_r: float, fascia_r: float, rng: np.random.Generator
) -> list[tuple[float, float, float, float]]:
    """Mesorectal lymph nodes (x, y, z, radius), as many as cN says."""
    n_nodes = {
        "N0": int(rng.integers(0, 2)),
        "N1": int(rng.integers(1, 4)),
        "N2": int(rng.integers(4, 7)),
    }[cn]
    nodes = []
    for _ in range(n_nodes):
        theta = rng.uniform(0, 2 * np.pi)
        lo = wall_r + 2.5
        rad = rng.uniform(lo, max(lo + 0.5, fascia_r - 2.5))
        nodes.append(
            (
                float(rad * np.cos(theta)),
                float(rad * np.sin(theta)),
                float(rng.uniform(-20, 20)),
                float(rng.uniform(3.0, 4.5) if cn != "N0" else 2.0),
            )
        )
    return nodes


def _lateral_node(
    fascia_rx: float, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A lateral lymph node outside the fascia, on a random side."""
    side = rng.choice([-1.0, 1.0])
    return (
        float(side * (fascia_rx + rng.uniform(8, 14))),
        float(rng.uniform(-5, 10)),
        float(rng.uniform(-10, 10)),
        float(rng.uniform(4.0, 6.0)),
    )


def smooth_noise(
    shape: tuple[int, ...], sigma_vox: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance smooth Gaussian noise (for tumour texture)."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), sigma_vox
    )
    return field / (field.std() + 1e-6)


def from_centre_line(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, anat: Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """In-plane offsets from the curving rectal centre line."""
    cx = anat.curve_amp * np.sin(z / 25.0 + anat.curve_phase)
    cy = 0.5 * anat.curve_amp * np.cos(z / 30.0 + anat.curve_phase)
    return x - cx, y - cy


def tumour_depth(
    dx: np.ndarray, dy: np.ndarray, z: np.ndarray, r: np.ndarray, anat: Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Tumour mask and depth from coordinates relative to the rectal centre line.

    The tumour is a tapered sector of the wall, protruding into the lumen and
    extending outward by the stage-dependent extension, plus an EMVI vein.
    Depth (0 at the edge, 1 at the centre of the sector) is the product of the
    taper and the radial centrality; the necrotic core is where it exceeds
    ``anat.core_depth``. Only points in the tumour's bounding cylinder are
    evaluated in detail.

    Returns:
        ``(mask, depth)``, both shaped like ``r`` (depth 0 outside the sector).
    """
    reach = anat.wall_r + max(anat.extension, 0.0) + (9.0 if anat.emvi else 0.0)
    half_len = anat.tumour_len / 2.0
    tumour = np.zeros(r.shape, dtype=bool)
    depth = np.zeros(r.shape, dtype=np.float32)
    near = (np.abs(z - anat.tumour_z0) < max(half_len, 2.5)) & (r <= reach)
    ndx, ndy, nz, nr = dx[near], dy[near], z[near], r[near]
    theta = np.arctan2(ndy, ndx)
    dtheta = (theta - anat.tumour_theta0 + np.pi) % (2 * np.pi) - np.pi
    dz = (nz - anat.tumour_z0) / half_len
    taper = 1.0 - (dtheta / anat.tumour_halfwidth) ** 2 - dz**2
    f = np.sqrt(np.clip(taper, 0.0, None))
    r_in = anat.lumen_r - anat.protrusion * f
    r_out = anat.wall_r + anat.extension * f
    inside = (taper > 0) & (nr >= r_in) & (nr <= r_out)
    s = (nr - r_in) / np.maximum(r_out - r_in, 1e-6)
    sector_depth = np.where(inside, f * (1.0 - np.abs(2.0 * s - 1.0)), 0.0)
    if anat.emvi:
        # A tumour-filled vein leaving the tumour edge into the mesorectal fat.
        ang = anat.tumour_theta0 + anat.emvi_theta
        ux, uy = np.cos(ang), np.sin(ang)
        along = ndx * ux + ndy * uy
        across = np.abs(-ndx * uy + ndy * ux)
        inside |= (
            (along > anat.wall_r)
            & (along < reach)
            & (across < 1.6)
            & (np.abs(nz - anat.tumour_z0) < 2.5)
        )
    tumour[near] = inside
    depth[near] = sector_depth
    return tumour, depth


def core_depth_for(anat: Anatomy, fraction: float, step_mm: float = 0.5) -> float:
    """The depth threshold whose core holds ``fraction`` of the tumour volume.

    Measured on a fine lattice in the tumour's own coordinates, so the core is
    the same physical region whatever grid samples it.
    """
    if fraction <= 0:
        return float(np.inf)
    reach = anat.wall_r + max(anat.extension, 0.0)
    half_len = anat.tumour_len / 2.0
    ax = np.arange(-reach, reach + step_mm, step_mm, dtype=np.float32)
    z_lo, z_hi = anat.tumour_z0 - half_len, anat.tumour_z0 + half_len + 1.0
    zs = np.arange(z_lo, z_hi, 1.0, dtype=np.float32)
    dx, dy, z = np.meshgrid(ax, ax, zs, indexing="ij")
    mask, depth = tumour_depth(dx, dy, z, np.hypot(dx, dy), anat)
    if not mask.any():
        return float(np.inf)
    # the EMVI vein (depth 0) counts in the volume but is never core
    return float(np.quantile(depth[mask], 1.0 - fraction))
