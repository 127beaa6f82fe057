"""A brain MRI phantom with a glioma: four co-registered contrasts and tissue classes.

Like real BraTS/Decathlon volumes it is skull-stripped (background exactly 0), 1 mm
isotropic, and the tumour has an oedema halo around a core with an enhancing rim and a
necrotic centre. Brain shape, size, position, rotation, intensities, bias field and the
tumour's position, size and lobulation all vary per case, so a model has to learn the
contrasts rather than memorise a location. Everything derives from one numpy Generator:
a case is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REAL_SHAPE = (240, 240, 155)
DIFFICULTIES = ("standard", "hard")

# Tissue classes used internally; each dataset maps them to its own label values.
BACKGROUND, OEDEMA, NECROTIC, ENHANCING = 0, 1, 2, 3
_CSF, _GREY, _WHITE = 10, 11, 12
# The tumour's (oedema's) ellipsoid holds at most this share of the brain's; it keeps at
# least this much oedema around the core when the cap applies.
MAX_TUMOUR_FRACTION = 1 / 4
_MIN_HALO = 1.2

# Mean intensity (arbitrary units) of each tissue in each contrast, roughly as seen in
# BraTS: oedema bright on FLAIR/T2, enhancing rim bright on T1ce, CSF bright on T2.
_CONTRAST = {
    #           CSF   grey  white oedema necrotic enhancing
    "flair": (0.10, 0.55, 0.45, 0.95, 0.60, 0.80),
    "t1":    (0.15, 0.45, 0.70, 0.35, 0.20, 0.45),
    "t1ce":  (0.15, 0.47, 0.72, 0.38, 0.22, 1.05),
    "t2":    (0.95, 0.60, 0.40, 0.85, 0.90, 0.70),
}
MODALITY_ORDER = ("flair", "t1", "t1ce", "t2")


# Hard phantom: each tumour tissue's signed contrast against the tissue it infiltrates, per
# contrast; the case draws one faintness in [0.2, 0.45] that scales the oedema's and the rim's
# (and the necrosis's; a non-enhancing core follows the oedema within a few percent).
_HARD_OEDEMA = {"flair": 1.0, "t1": -0.45, "t1ce": -0.40, "t2": 0.85}
_HARD_RIM = {"flair": 0.6, "t1": -0.2, "t1ce": 1.0, "t2": 0.5}
HARD_CONTRAST_RANGE = (0.20, 0.45)
HARD_RIMLESS_SHARE = 1 / 7
# Where a hard case has a rim, it enhances only on a cap of the core's surface facing up or down
# (tilted by up to ~15 degrees); below the cap the core neither enhances nor is necrotic. The
# cap's edge lies at this range of cosines from its axis, so 16-30% of the core's axial slices
# (20-45% of its voxels) show neither rim nor necrosis: in one slice that core looks like oedema,
# in the volume it continues the rimmed part.
HARD_RIM_CUT_RANGE = (-0.6, 0.0)
# Behind an enhancing cap the core is necrotic and plain to see (dark on T1/T1ce, bright on T2),
# as real necrosis is. Below the cap, and in cases without a rim, the core does not enhance:
HARD_CORE_OFFSET_RANGE = (0.03, 0.06)  # |core / oedema - 1| per contrast, no rim anywhere (low grade)
HARD_HIDDEN_CORE_OFFSET_RANGE = (0.0, 0.015)  # the same below a rim's cap: under the lesion's texture
_HARD_NECROSIS = {"flair": -0.6, "t1": -0.8, "t1ce": -0.9, "t2": 0.6}  # against the oedema, x faintness
INFILTRATION_FADE = 0.12  # the outer share of the oedema's radius over which its signal fades out


@dataclass(frozen=True)
class PhantomCase:
    images: dict[str, np.ndarray]  # modality -> (x, y, z) float32, 0 outside the brain
    classes: np.ndarray            # (x, y, z) uint8 in {BACKGROUND, OEDEMA, NECROTIC, ENHANCING}
    high_grade: bool
    contrast: float | None = None  # hard: the oedema's FLAIR contrast against the tissue it infiltrates
    hidden_core: np.ndarray | None = None  # hard: core voxels below a rim's cap, near-oedema in every contrast


def make_case(seed: int | tuple[int, ...], shape: tuple[int, int, int] = REAL_SHAPE,
              difficulty: str = "standard") -> PhantomCase:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {DIFFICULTIES}, got {difficulty!r}")
    rng = np.random.default_rng(seed)
    hard = difficulty == "hard"
    scale = np.asarray(shape, dtype=np.float32) / np.asarray(REAL_SHAPE, dtype=np.float32)
    x, y, z, grid = _centred_grid(shape, rng, scale)

    brain_radii = np.array([68, 84, 62]) * rng.uniform(0.88, 1.1, 3)
    brain_r = _ellipsoid_distance(x, y, z, brain_radii * scale)
    # Gyral folding: a small high-frequency wobble of the brain boundary.
    folds = 0.025 * _smooth_field(x, y, z, rng, freq=0.35 / scale.mean(), terms=4)
    brain = brain_r < (1.0 + folds)

    tissue = np.where(brain_r < 0.78 + folds * 2, _WHITE, _GREY).astype(np.uint8)
    ventricle_radii = np.array([10, 24, 14]) * rng.uniform(0.7, 1.3, 3) * scale
    offset = rng.uniform(6, 10) * scale[0]
    for side in (-1, 1):
        ventricles = _ellipsoid_distance(x - side * offset, y, z - 4 * scale[2], ventricle_radii) < 1
        tissue[ventricles] = _CSF
    tissue[brain_r > 0.97] = _CSF  # sulcal CSF rim at the surface

    classes = np.zeros(shape, dtype=np.uint8)
    high_grade = bool(rng.random() < (1 - HARD_RIMLESS_SHARE if hard else 0.75))
    infiltration, hidden_core = _add_tumour(classes, x, y, z, grid, brain, brain_radii * scale, scale, rng,
                                            high_grade, partial_rim=hard)
    classes[~brain] = BACKGROUND
    if hard:
        hidden_core &= classes == NECROTIC
        images, contrast = _hard_images(tissue, classes, infiltration, hidden_core, high_grade, brain, x, y, z,
                                        scale, rng)
        return PhantomCase(images=images, classes=classes, high_grade=high_grade, contrast=contrast,
                           hidden_core=hidden_core)

    bias = 1.0 + 0.12 * _smooth_field(x, y, z, rng, freq=0.02 / scale.mean(), terms=3)
    images = {}
    for modality in MODALITY_ORDER:
        means = np.asarray(_CONTRAST[modality]) * rng.uniform(0.85, 1.15, 6)
        lut = np.zeros(16, dtype=np.float32)
        lut[[_CSF, _GREY, _WHITE]] = means[:3]
        image = lut[tissue]
        tumour = classes > 0
        tumour_lut = np.zeros(4, dtype=np.float32)
        tumour_lut[[OEDEMA, NECROTIC, ENHANCING]] = means[3:]
        image[tumour] = tumour_lut[classes[tumour]]
        image *= bias
        image += rng.normal(0.0, rng.uniform(0.02, 0.04), size=shape).astype(np.float32)
        image = np.clip(image, 0.01, None) * rng.uniform(600, 1400)
        image[~brain] = 0.0
        images[modality] = image.astype(np.float32)
    return PhantomCase(images=images, classes=classes, high_grade=high_grade)


def _hard_images(tissue, classes, infiltration, hidden_core, high_grade, brain, x, y, z, scale,
                 rng) -> tuple[dict[str, np.ndarray], float]:
    """The hard phantom's contrasts: faint, heterogeneous, infiltrative (see the module docstring)."""
    faintness = rng.uniform(*HARD_CONTRAST_RANGE)
    # a non-enhancing core vs oedema: a few percent in every contrast, of either sign; below a
    # rim's cap, less than the texture's spread, so one slice cannot tell it from oedema
    offset_range = HARD_HIDDEN_CORE_OFFSET_RANGE if high_grade else HARD_CORE_OFFSET_RANGE
    core_offsets = rng.uniform(*offset_range, len(MODALITY_ORDER)) * rng.choice([-1.0, 1.0], len(MODALITY_ORDER))
    bias = 1.0 + 0.2 * _smooth_field(x, y, z, rng, freq=0.02 / scale.mean(), terms=3)
    texture = 0.12 * _smooth_field(x, y, z, rng, freq=0.25 / scale.mean(), terms=4)  # heterogeneity
    noise = rng.uniform(0.03, 0.06)
    images = {}
    for index, modality in enumerate(MODALITY_ORDER):
        means = np.asarray(_CONTRAST[modality]) * rng.uniform(0.85, 1.15, 6)
        lut = np.zeros(16, dtype=np.float32)
        lut[[_CSF, _GREY, _WHITE]] = means[:3]
        image = lut[tissue]
        # Contrast against the parenchyma the tumour infiltrates (it displaces CSF), not a fixed value.
        parenchyma = np.where(tissue == _CSF, means[2], image).astype(np.float32)
        oedema = parenchyma * (1 + faintness * _HARD_OEDEMA[modality])
        non_enhancing = oedema * (1 + core_offsets[index])
        necrosis = oedema * (1 + faintness * _HARD_NECROSIS[modality])
        core = np.where(hidden_core | (not high_grade), non_enhancing, necrosis)
        rim = parenchyma * (1 + faintness * _HARD_RIM[modality])
        tumour = classes > 0
        target = np.where(classes == ENHANCING, rim, np.where(classes == NECROTIC, core, oedema)).astype(np.float32)
        # Infiltrative: the signal change fades towards the oedema's labelled edge.
        weight = np.where(classes == OEDEMA, infiltration, 1.0).astype(np.float32)
        change = (target - image) * weight * (1 + texture)
        image = np.where(tumour, image + change, image)
        image = image * bias
        image += rng.normal(0.0, noise, size=tissue.shape).astype(np.float32)
        image = np.clip(image, 0.01, None) * rng.uniform(600, 1400)
        image[~brain] = 0.0
        images[modality] = image.astype(np.float32)
    return images, float(faintness * _HARD_OEDEMA["flair"])


def _centred_grid(shape, rng, scale):
    """Broadcastable coordinates in mm-like units, shifted and rotated per case."""
    centre = (np.asarray(shape) - 1) / 2 + rng.uniform(-8, 8, 3) * scale
    x = (np.arange(shape[0], dtype=np.float32) - centre[0])[:, None, None]
    y = (np.arange(shape[1], dtype=np.float32) - centre[1])[None, :, None]
    z = (np.arange(shape[2], dtype=np.float32) - centre[2])[None, None, :]
    angle = np.deg2rad(rng.uniform(-12, 12))
    xr = np.cos(angle) * x + np.sin(angle) * y
    yr = -np.sin(angle) * x + np.cos(angle) * y
    return xr.astype(np.float32), yr.astype(np.float32), z, (centre, angle)


def _ellipsoid_distance(x, y, z, radii):
    """Normalised ellipsoid distance: < 1 inside."""
    return np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)


def _smooth_field(x, y, z, rng, freq, terms):
    """A cheap smooth random field in [-1, 1]: a sum of random plane waves."""
    field = 0.0
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = direction * freq * rng.uniform(0.5, 1.5)
        field = field + np.sin(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * np.pi))
    return (field / terms).astype(np.float32)


def _add_tumour(classes, x, y, z, grid, brain, brain_radii, scale, rng, high_grade, partial_rim=False):
    """Oedema halo around a lobulated core: enhancing rim + necrotic centre (HGG-like); with
    ``partial_rim`` the rim covers only a cap of the core (HARD_RIM_CUT_RANGE).

    Returns the infiltration weight and the mask of core voxels below the cap (empty without
    ``partial_rim``), both over the whole volume."""
    # Centre: anywhere in the inner 60 % of the brain, so position varies a lot.
    while True:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = direction * brain_radii * rng.uniform(0.0, 0.6)
        if np.linalg.norm(centre / brain_radii) < 0.6:
            break
    core_radii = rng.uniform(10, 26) * rng.uniform(0.75, 1.25, 3) * scale
    halo = rng.uniform(1.5, 2.4)
    core_radii, halo = _cap_tumour_volume(core_radii, halo, brain_radii)
    box = _bounding_box(centre, core_radii * halo * 1.35, grid, classes.shape)
    px = x[box[0], box[1]] - centre[0]
    py = y[box[0], box[1]] - centre[1]
    pz = z[:, :, box[2]] - centre[2]
    lobes = 1.0 + 0.22 * _smooth_field(px, py, pz, rng, freq=1.6 / core_radii.mean(), terms=3)
    core = _ellipsoid_distance(px, py, pz, core_radii) / lobes
    oedema_lobes = 1.0 + 0.3 * _smooth_field(px, py, pz, rng, freq=0.9 / core_radii.mean(), terms=3)
    oedema = _ellipsoid_distance(px, py, pz, core_radii * halo) / oedema_lobes

    region = np.zeros(core.shape, dtype=np.uint8)
    below_cap = np.zeros(core.shape, dtype=bool)
    region[oedema < 1.0] = OEDEMA
    if high_grade:
        rim = rng.uniform(0.55, 0.75)
        region[core < 1.0] = ENHANCING
        region[core < rim] = NECROTIC
        if partial_rim:  # draws only in the hard phantom: the standard one's rng is untouched
            axis = np.array([*rng.normal(0.0, 0.25, 2), rng.choice([-1.0, 1.0])])
            axis /= np.linalg.norm(axis)
            cut = rng.uniform(*HARD_RIM_CUT_RANGE)
            u, v, w = px / core_radii[0], py / core_radii[1], pz / core_radii[2]
            cosine = (u * axis[0] + v * axis[1] + w * axis[2]) / np.sqrt(u * u + v * v + w * w + 1e-6)
            below_cap = (region >= NECROTIC) & (cosine < cut)
            region[below_cap] = NECROTIC
    else:  # low grade: a non-enhancing core, little or no enhancement
        region[core < 1.0] = NECROTIC
    region[~brain[box]] = BACKGROUND
    classes[box] = np.maximum(classes[box], region)
    # How strongly each voxel shows the tumour: 1 inside, fading across the oedema's outer rim
    # (used by the hard phantom only; drawing nothing, it leaves the rng as it was).
    infiltration = np.zeros(classes.shape, dtype=np.float32)
    infiltration[box] = np.clip((1.0 - oedema) / INFILTRATION_FADE, 0.0, 1.0)
    hidden_core = np.zeros(classes.shape, dtype=bool)
    hidden_core[box] = below_cap
    return infiltration, hidden_core


def _cap_tumour_volume(core_radii, halo, brain_radii):
    """Shrink the oedema (then the core) so the tumour's ellipsoid is at most a quarter of the brain's.

    Uncapped, the draws above made 3 of 20 default cases 42-85 % tumour, a brain that
    is mostly oedema: no real scan looks like that, and one such case in a 3-case
    validation split decided the validation figure alone. Shrinking draws no random
    numbers, so every case under the cap stays bit-identical.
    """
    def excess(halo_now):
        return np.prod(core_radii * halo_now) / np.prod(brain_radii) / MAX_TUMOUR_FRACTION

    if excess(halo) <= 1.0:
        return core_radii, halo
    capped_halo = max(_MIN_HALO, halo / excess(halo) ** (1 / 3))
    return core_radii / max(1.0, excess(capped_halo)) ** (1 / 3), capped_halo


def _bounding_box(centre, reach, grid, shape):
    """Index-space box around a point given in the rotated frame (rotation about z)."""
    grid_centre, angle = grid
    cx = np.cos(angle) * centre[0] - np.sin(angle) * centre[1]
    cy = np.sin(angle) * centre[0] + np.cos(angle) * centre[1]
    half_xy = float(np.hypot(reach[0], reach[1]))
    half = (half_xy, half_xy, float(reach[2]))
    index_centre = np.asarray([cx, cy, centre[2]]) + grid_centre
    return tuple(slice(max(0, int(c - h)), min(n, int(np.ceil(c + h)) + 1))
                 for c, h, n in zip(index_centre, half, shape))
