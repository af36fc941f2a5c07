"""Analytic pelvic MRI phantom: one patient's T2W, ADC and tumour mask.

The anatomy is defined in physical coordinates (millimetres, RAS world, the
rectum running inferior-superior along ``z``), so each image grid samples the
same patient: the T2W stack (fine in-plane, thick slices, axial-oblique), and
the DWI/ADC stack on its own coarser grid. The ADC is then resampled onto the
T2W grid with trilinear interpolation, because nnU-Net needs every channel of a
case on one grid; the blur this adds is what a site's own registration does.

Tissues (T2W relative signal / ADC in 10^-3 mm^2/s):
mesorectal and pelvic fat 0.85 / 0.35 (fat-suppressed DWI), rectal wall 0.30 /
1.55, mesorectal fascia 0.18 / 1.2, pelvic muscle 0.25 / 1.40, bladder 1.0 /
2.9, lumen gas 0.05 / 0 or fluid 0.9 / 2.8, lymph nodes 0.5 / 0.9, tumour 0.55
with the patient's texture / the patient's ADC with the same texture; the
tumour's necrotic core 0.85 / 1.9 (the readout of the hypoxia latent: its
volume fraction of the tumour is the patient's ``core_fraction``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from simulations.anatomy import (
    Anatomy,
    core_depth_for,
    draw_anatomy,
    from_centre_line,
    smooth_noise,
    tumour_depth,
)
from simulations.cohort import Patient
from simulations.sites import Geometry, Scanner

FAT = (0.85, 0.35)
WALL = (0.30, 1.55)
FASCIA = (0.18, 1.2)
MUSCLE = (0.25, 1.40)
BLADDER = (1.0, 2.9)
GAS = (0.05, 0.0)
FLUID = (0.9, 2.8)
NODE = (0.5, 0.9)
TUMOUR_T2 = 0.55
CORE = (0.85, 1.9)  # necrotic core: high T2W, high ADC (restricted diffusion lost)
AIR = (0.0, 0.0)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape ``(X, Y, Z)`` (Z = slice axis) and its 4x4 affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def world(self, sub_offsets: np.ndarray | None = None) -> np.ndarray:
        """World coordinates of voxel centres, shape ``(3, X, Y, Z)``.

        ``sub_offsets`` adds a fractional voxel offset along the slice axis
        (used to integrate over the slice profile).
        """
        idx = np.indices(self.shape, dtype=np.float32)
        if sub_offsets is not None:
            idx[2] += np.float32(sub_offsets)
        a = self.affine.astype(np.float32)
        return np.einsum("ij,jxyz->ixyz", a[:3, :3], idx) + a[:3, 3, None, None, None]


_AXIS = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}


def build_grid(
    *,
    inplane_mm: float,
    slice_mm: float,
    n_inplane: int,
    n_slices: int,
    oblique_deg: float,
    axcodes: str,
    centre: np.ndarray,
) -> Grid:
    """An axial-oblique grid centred on ``centre`` (world mm).

    The stack is tilted by ``oblique_deg`` about the left-right axis, as a
    radiographer angles it perpendicular to the tumour's axis. ``axcodes``
    gives the stored direction of each voxel axis (e.g. "LPS").
    """
    t = np.deg2rad(oblique_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    direction = np.zeros((3, 3))
    for col, code in enumerate(axcodes):
        axis, sign = _AXIS[code]
        direction[:, col] = rot[:, axis] * sign
    spacing = np.array([inplane_mm, inplane_mm, slice_mm])
    shape = (n_inplane, n_inplane, n_slices)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    half = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = centre - affine[:3, :3] @ half
    return Grid(shape, affine)


def tissue_maps(
    xyz: np.ndarray,
    anat: Anatomy,
    adc_tumour: float,
    texture: Callable[[np.ndarray], np.ndarray] | None,
    heterogeneity: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate the phantom at world points ``xyz`` (3, ...).

    ``texture`` maps world points ``(3, K)`` inside the tumour to unit-variance
    texture values ``(K,)``; it is only evaluated there, which keeps large grids
    fast.

    Returns:
        ``(t2, adc, tumour)``: relative T2W signal, ADC (10^-3 mm^2/s) and the
        boolean tumour mask, each shaped like ``xyz[0]``.
    """
    x, y, z = xyz[0], xyz[1], xyz[2]
    dx, dy = from_centre_line(x, y, z, anat)
    r = np.hypot(dx, dy)

    t2 = np.full(x.shape, AIR[0], dtype=np.float32)
    adc = np.full(x.shape, AIR[1], dtype=np.float32)

    def paint(mask: np.ndarray, tissue: tuple[float, float]) -> None:
        t2[mask] = tissue[0]
        adc[mask] = tissue[1]

    body = (x / 110.0) ** 2 + ((y + 5) / 85.0) ** 2 <= 1.0
    paint(body, FAT)
    muscle_r = np.hypot(x / 62.0, (y + 5) / 50.0)
    paint(body & (muscle_r > 1.0) & (muscle_r < 1.22), MUSCLE)
    paint((x / 30.0) ** 2 + ((y - 52) / 20.0) ** 2 <= 1.0, BLADDER)
    fascia_q = np.hypot(dx / anat.fascia_rx, dy / anat.fascia_ry)
    paint(np.abs(fascia_q - 1.0) < 1.0 / anat.fascia_rx, FASCIA)
    for nx, ny, nz, nr in anat.nodes:
        paint((dx - nx) ** 2 + (dy - ny) ** 2 + (z - nz) ** 2 <= nr**2, NODE)
    if anat.lln is not None:
        lx, ly, lz, lr = anat.lln
        paint((x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 <= lr**2, NODE)
    paint(r <= anat.wall_r, WALL)
    paint(r <= anat.lumen_r, FLUID if anat.lumen_fluid else GAS)

    tumour, depth = tumour_depth(dx, dy, z, r, anat)
    tex = texture(xyz[:, tumour]) if texture is not None else 0.0
    core = depth[tumour] > anat.core_depth
    t2_viable = TUMOUR_T2 * (1.0 + heterogeneity * tex)
    adc_viable = adc_tumour * (1.0 + 0.8 * heterogeneity * tex)
    t2[tumour] = np.where(core, CORE[0] * (1.0 + 0.5 * heterogeneity * tex), t2_viable)
    adc[tumour] = np.clip(
        np.where(core, CORE[1] * (1.0 + 0.3 * heterogeneity * tex), adc_viable),
        0.3,
        2.5,
    )
    return t2, adc, tumour


def bias_field(
    world: np.ndarray, amplitude: float, rng: np.random.Generator
) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field (low-order polynomial)."""
    x, y, z = world[0] / 100.0, world[1] / 100.0, world[2] / 100.0
    c = rng.normal(0, 1, size=6)
    poly = (
        c[0] * x
        + c[1] * y
        + 0.5 * c[2] * z
        + 0.5 * c[3] * x * y
        + 0.5 * c[4] * x**2
        + 0.5 * c[5] * y**2
    )
    poly = poly / (np.abs(poly).max() + 1e-6)
    return (1.0 + amplitude * poly).astype(np.float32)


@dataclass(frozen=True)
class CaseImages:
    """One generated case, ready to write as NIfTI."""

    t2: np.ndarray  # (X, Y, Z) int16
    adc: np.ndarray  # (X, Y, Z) float32 (10^-3) or int16 (10^-6)
    label: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # T2W grid affine, shared by all three
    tumour_volume_ml: float
    core_volume_ml: float = 0.0  # necrotic core, on the T2W grid


def scanner_grids(
    scanner: Scanner, geometry: Geometry, centre: np.ndarray
) -> tuple[Grid, Grid]:
    """The T2W and ADC grids a scanner acquires at a preset's geometry."""
    fov = scanner.fov_mm * geometry.fov_factor
    t2_inplane = scanner.t2_inplane_mm * geometry.inplane_factor
    n_slices = max(8, round(scanner.n_slices * geometry.slice_factor))
    t2 = build_grid(
        inplane_mm=t2_inplane,
        slice_mm=scanner.t2_slice_mm,
        n_inplane=round(fov / t2_inplane),
        n_slices=n_slices,
        oblique_deg=scanner.oblique_deg,
        axcodes=scanner.axcodes,
        centre=centre,
    )
    adc_inplane = max(scanner.adc_inplane_mm, t2_inplane)
    coverage = n_slices * scanner.t2_slice_mm
    adc = build_grid(
        inplane_mm=adc_inplane,
        slice_mm=scanner.adc_slice_mm,
        n_inplane=round(fov / adc_inplane) + 2,
        n_slices=int(np.ceil(coverage / scanner.adc_slice_mm)) + 2,
        oblique_deg=scanner.oblique_deg,
        axcodes=scanner.axcodes,
        centre=centre,
    )
    return t2, adc


def place_case(
    patient: Patient, rng: np.random.Generator
) -> tuple[Anatomy, np.ndarray]:
    """The patient's anatomy and the centre (world mm) of its image stacks, the
    first draws from the case's generator (``patient.image_seed``)."""
    anat = draw_anatomy(patient, rng)
    centre = np.array(
        [rng.normal(0, 4), rng.normal(0, 4), anat.tumour_z0 + rng.normal(0, 2)]
    )
    return anat, centre


def case_grids(
    patient: Patient, scanner: Scanner, geometry: Geometry
) -> tuple[Grid, Grid]:
    """The T2W and ADC grids of the patient's case, exactly those
    :func:`generate_case` images (without imaging it): the T2W grid's shape
    and affine are those of the case's three NIfTI files."""
    _, centre = place_case(patient, np.random.default_rng(patient.image_seed))
    return scanner_grids(scanner, geometry, centre)


def generate_case(patient: Patient, scanner: Scanner, geometry: Geometry) -> CaseImages:
    """Generate one patient's T2W, ADC (on the T2W grid) and tumour mask.

    Deterministic for ``patient.image_seed``.
    """
    rng = np.random.default_rng(patient.image_seed)
    anat, centre = place_case(patient, rng)
    anat = replace(anat, core_depth=core_depth_for(anat, patient.core_fraction))
    t2_grid, adc_grid = scanner_grids(scanner, geometry, centre)

    # Tumour texture lives in physical space: sample it on a 1 mm lattice around
    # the tumour and look it up at each grid's points.
    half = 60.0
    lattice = smooth_noise((121, 121, 121), (1.5, 1.5, 1.5), rng)

    def texture_at(points: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(lattice, points + half, order=1, mode="nearest")

    # T2W: integrate the slice profile with sub-slice samples, then blur
    # slightly in-plane (point-spread function) and add a bias field + Rician noise.
    t2_acc = np.zeros(t2_grid.shape, dtype=np.float32)
    offsets = (-0.25, 0.25)
    for off in offsets:
        w = t2_grid.world(np.array(off))
        t2_rel, _, _ = tissue_maps(
            w, anat, patient.adc_mean, texture_at, patient.heterogeneity
        )
        t2_acc += t2_rel
    world = t2_grid.world()
    dx, dy = from_centre_line(world[0], world[1], world[2], anat)
    tumour, depth = tumour_depth(dx, dy, world[2], np.hypot(dx, dy), anat)
    core = tumour & (depth > anat.core_depth)
    t2_rel = ndimage.gaussian_filter(t2_acc / len(offsets), (0.6, 0.6, 0.0))
    gain = scanner.t2_gain * float(rng.uniform(0.9, 1.1))
    signal = gain * t2_rel * bias_field(world, scanner.bias, rng)
    sigma = scanner.noise * scanner.t2_gain
    noisy = np.hypot(
        signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape)
    )
    t2 = np.clip(np.round(noisy), 0, 32767).astype(np.int16)

    # ADC on its own coarse grid, then trilinear resampling onto the T2W grid.
    adc_acc = np.zeros(adc_grid.shape, dtype=np.float32)
    adc_offsets = (-0.25, 0.25)
    for off in adc_offsets:
        w = adc_grid.world(np.array(off))
        _, a, _ = tissue_maps(
            w, anat, patient.adc_mean, texture_at, patient.heterogeneity
        )
        adc_acc += a
    adc_coarse = adc_acc / len(adc_offsets)
    adc_coarse = np.clip(
        adc_coarse + rng.normal(0, scanner.adc_noise, adc_coarse.shape), 0, None
    )
    to_adc_vox = np.linalg.inv(adc_grid.affine)
    pts = world.reshape(3, -1)
    vox = to_adc_vox[:3, :3] @ pts + to_adc_vox[:3, 3:4]
    adc = ndimage.map_coordinates(
        adc_coarse.astype(np.float32), vox, order=1, mode="nearest"
    ).reshape(t2_grid.shape)
    if scanner.adc_unit == "1e-6":
        adc_out: np.ndarray = np.round(adc * 1000.0).astype(np.int16)
    else:
        adc_out = adc.astype(np.float32)

    voxel_ml = float(abs(np.linalg.det(t2_grid.affine[:3, :3]))) / 1000.0
    return CaseImages(
        t2=t2,
        adc=adc_out,
        label=tumour.astype(np.uint8),
        affine=t2_grid.affine,
        tumour_volume_ml=float(tumour.sum()) * voxel_ml,
        core_volume_ml=float(core.sum()) * voxel_ml,
    )
