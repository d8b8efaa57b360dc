"""The analytic beating-heart phantom: the embedded default cohort, with exact motion.

Anatomy (heart-local frame, mm; z along the LV long axis, base plane z = 0, apex at z = −L):
the LV cavity is the half prolate ellipsoid (r/a)² + (z/L)² ≤ 1, z ≤ 0; the myocardium the
shell out to semi-axes (a + w, L + w); an RV crescent wraps the septum; the left atrium and the
aortic root sit above the base; mediastinal fat surrounds the heart and lung fills the rest.

Motion from ED (material configuration X) to a phase with contraction fraction f ∈ [0, 1]
(0 at ED, 1 at ES), in cylindrical heart coordinates (r, θ, z):

* longitudinal shortening, apex fixed: z' = −L + (z + L)·λ, λ = 1 − s·f;
* cavity: r' = κ·r with κ² = (1 − EF·f)/λ, so the cavity volume scales by exactly 1 − EF·f;
* myocardium, incompressible: r'² = r²/λ − r_e(z)²·(1/λ − κ²) (det J = 1, wall thickening);
* twist θ' = θ + f·τ(z), τ from τ_base at the base to τ_apex at the apex;
* outside the LV the displacement fades with a Gaussian weight of the distance to the epicardium.

The forward map φ_f(X) = X + d_f(X) is analytic, so the ED←ES pull field is exact:
u(x) = d_ES(x), with ED(x) = ES(x + u(x)). Frames are rendered by inverting φ (fixed point
X = y − d(X)) and evaluating soft (erf-edged, i.e. Gaussian-blurred) structures at X.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy.special import erf

from ..layout import PHANTOM_CT, PHANTOM_LABELS, PHANTOM_META, PHANTOM_TRUTH_FLOW

# Labels of labels.nii.gz.
BACKGROUND, LV_BLOOD, LV_MYO, RV_BLOOD, RV_WALL, LA_BLOOD, AORTA = 0, 1, 2, 3, 4, 5, 6
LABEL_NAMES = {
    BACKGROUND: "background",
    LV_BLOOD: "LV blood pool",
    LV_MYO: "LV myocardium",
    RV_BLOOD: "RV blood pool",
    RV_WALL: "RV wall",
    LA_BLOOD: "LA blood pool",
    AORTA: "aortic root",
}
#: the ventricles' blood pools and walls: the "heart" of the annotation and refinement tables
HEART_LABELS = (LV_BLOOD, LV_MYO, RV_BLOOD, RV_WALL)


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The regions flows are scored in, from an ED label volume (I, J, K): ``heart`` (the
    ventricles, :data:`HEART_LABELS`) and ``myo`` (the LV myocardium), boolean (I, J, K)."""
    labels = np.asarray(labels)
    return {"heart": np.isin(labels, HEART_LABELS), "myo": labels == LV_MYO}


@dataclass(frozen=True)
class PhantomParams:
    """One patient's anatomy, motion and appearance (lengths mm, angles degrees, HU)."""

    lv_radius: float  # a: ED endocardial short-axis radius
    lv_length: float  # L: ED endocardial base-to-apex length
    wall: float  # ED myocardial wall thickness
    apex_dir: tuple[float, float, float]  # unit vector base→apex in RAS world
    center_offset: tuple[float, float, float]  # heart centre relative to the volume centre
    rv_scale: float  # RV size relative to the LV radius
    ef: float  # ejection fraction (cavity volume ES = (1 − ef)·ED)
    shortening: float  # longitudinal shortening fraction s
    twist_base: float
    twist_apex: float
    es_fraction: float  # ES as a fraction of the R-R interval (a multiple of 1/phases)
    blood_hu: float
    rv_blood_hu: float
    myo_hu: float
    fat_hu: float
    lung_hu: float
    noise_sd: float
    blur_mm: float
    motion_decay_mm: float  # Gaussian fall-off of motion outside the LV


def draw_params(rng: np.random.Generator, phases: int = 10, rv_contrast: float = 1.0) -> PhantomParams:
    """Draw a patient's parameters from the cohort's ranges (seeded ``rng``). ``rv_contrast``
    scales the RV blood's enhancement above the myocardium (1: as drawn; 0: RV blood at the
    myocardium's HU, a right heart a saline chaser washed out); the draws are the same either way."""
    apex = np.array([-0.55, 0.45, -0.70]) + rng.normal(0.0, 0.08, 3)
    apex /= np.linalg.norm(apex)
    es_phase = int(np.clip(round(phases * rng.uniform(0.30, 0.40)), 1, phases - 1))
    blood = rng.uniform(390, 440)
    params = PhantomParams(
        lv_radius=float(rng.uniform(24.0, 28.0)),
        lv_length=float(rng.uniform(78.0, 90.0)),
        wall=float(rng.uniform(9.0, 11.0)),
        apex_dir=tuple(float(v) for v in apex),
        center_offset=tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)),
        rv_scale=float(rng.uniform(0.9, 1.15)),
        ef=float(rng.uniform(0.55, 0.65)),
        shortening=float(rng.uniform(0.13, 0.17)),
        twist_base=float(rng.uniform(-4.0, -2.0)),
        twist_apex=float(rng.uniform(8.0, 12.0)),
        es_fraction=es_phase / phases,
        blood_hu=float(blood),
        rv_blood_hu=float(blood - rng.uniform(10, 40)),  # RV a little less enhanced, still 350–450
        myo_hu=float(rng.uniform(95, 125)),
        fat_hu=float(rng.uniform(-110, -90)),
        lung_hu=float(rng.uniform(-830, -770)),
        noise_sd=float(rng.uniform(10, 20)),
        blur_mm=float(rng.uniform(0.8, 1.2)),
        motion_decay_mm=float(rng.uniform(18.0, 24.0)),
    )
    if rv_contrast != 1.0:
        params = replace(params, rv_blood_hu=params.myo_hu + rv_contrast * (params.rv_blood_hu - params.myo_hu))
    return params


def contraction(phase_fraction: np.ndarray | float, es_fraction: float) -> np.ndarray:
    """Contraction f ∈ [0, 1] over the R-R interval: 0 at ED (0 %), 1 at ES, smooth in between."""
    p = np.mod(np.asarray(phase_fraction, dtype=float), 1.0)
    systole = 0.5 * (1.0 - np.cos(np.pi * p / es_fraction))
    q = (p - es_fraction) / (1.0 - es_fraction)
    diastole = 0.5 * (1.0 + np.cos(np.pi * np.clip(q, 0.0, 1.0)))
    return np.where(p <= es_fraction, systole, diastole)


def _ellipsoid_sdf(p: np.ndarray, semi: tuple[float, float, float]) -> np.ndarray:
    """First-order signed distance (mm, < 0 inside) to an axis-aligned ellipsoid; p (..., 3)."""
    q = p / np.asarray(semi)
    rho = np.sqrt((q**2).sum(-1))
    grad = np.sqrt(((q / np.asarray(semi)) ** 2).sum(-1)) / np.maximum(rho, 1e-9)
    return (rho - 1.0) / np.maximum(grad, 1e-9)


class HeartModel:
    """Geometry, motion and appearance of one phantom patient in world (RAS mm) coordinates."""

    def __init__(self, params: PhantomParams, center: np.ndarray):
        self.p = params
        e3 = -np.asarray(params.apex_dir, dtype=float)  # local +z: apex → base
        toward_rv = np.array([1.0, 0.6, 0.0])  # the RV lies right-anterior of the LV
        e1 = toward_rv - e3 * (toward_rv @ e3)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(e3, e1)
        self.frame = np.stack([e1, e2, e3], axis=1)  # columns: local axes in world
        # Place the heart so that apex (−L−w) and atria (+40 mm) straddle the volume centre.
        mid = 0.5 * (-(params.lv_length + params.wall) + 40.0)
        self.origin = np.asarray(center, float) + np.asarray(params.center_offset) - mid * e3

    # ------------------------------------------------------------------ coordinates
    def to_local(self, x: np.ndarray) -> np.ndarray:
        """World points (..., 3) → heart-local (..., 3)."""
        return (x - self.origin) @ self.frame

    def to_world_vectors(self, v: np.ndarray) -> np.ndarray:
        return v @ self.frame.T

    # ------------------------------------------------------------------ motion
    def _lv_outside_distance(self, loc: np.ndarray) -> np.ndarray:
        a, L, w = self.p.lv_radius, self.p.lv_length, self.p.wall
        d_epi = np.maximum(_ellipsoid_sdf(loc, (a + w, a + w, L + w)), loc[..., 2])
        return np.maximum(d_epi, 0.0)

    def displacement(self, x: np.ndarray, f: float) -> np.ndarray:
        """d_f(X): displacement (..., 3) in mm of material points X (..., 3) at contraction f."""
        if f == 0.0:
            return np.zeros_like(x)
        p = self.p
        a, L = p.lv_radius, p.lv_length
        loc = self.to_local(x)
        x1, x2, z = loc[..., 0], loc[..., 1], loc[..., 2]
        lam = 1.0 - p.shortening * f
        kappa2 = (1.0 - p.ef * f) / lam
        r2 = x1**2 + x2**2
        re2 = np.where(z > 0, a * a, a * a * np.clip(1.0 - (z / L) ** 2, 0.0, 1.0))
        r2_new = np.where(r2 <= re2, kappa2 * r2, r2 / lam - re2 * (1.0 / lam - kappa2))
        scale = np.sqrt(np.maximum(r2_new, 0.0) / np.maximum(r2, 1e-12))
        scale = np.where(r2 > 1e-12, scale, math.sqrt(kappa2))
        depth = np.clip(-z / L, 0.0, 1.0)
        twist = np.deg2rad(p.twist_base + (p.twist_apex - p.twist_base) * depth) * f
        c, s = np.cos(twist), np.sin(twist)
        x1n = scale * (c * x1 - s * x2)
        x2n = scale * (s * x1 + c * x2)
        zn = -L + (z + L) * lam
        d_local = np.stack([x1n - x1, x2n - x2, zn - z], axis=-1)
        weight = np.exp(-((self._lv_outside_distance(loc) / p.motion_decay_mm) ** 2))
        return self.to_world_vectors(d_local * weight[..., None])

    def material_points(self, y: np.ndarray, f: float, iterations: int = 60, tol: float = 1e-4) -> np.ndarray:
        """Invert the motion: X with X + d_f(X) = y, by fixed-point iteration (y (..., 3) mm).

        Each point iterates until its own step is below ``tol`` mm (points far from the heart,
        where the motion fades, converge in a step or two and then drop out of the work set).
        """
        if f == 0.0:
            return y.copy()
        shape = y.shape
        y = y.reshape(-1, 3)
        x = y - self.displacement(y, f)
        active = np.arange(len(y))
        for _ in range(iterations):
            x_new = y[active] - self.displacement(x[active], f)
            step = np.abs(x_new - x[active]).max(axis=-1)
            x[active] = x_new
            active = active[step >= tol]
            if active.size == 0:
                break
        return x.reshape(shape)

    # ------------------------------------------------------------------ appearance
    def render(self, x: np.ndarray, edge_sd_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """HU and labels of material points x (..., 3); edges are Gaussian-blurred steps (σ mm)."""
        p = self.p
        a, L, w = p.lv_radius, p.lv_length, p.wall
        loc = self.to_local(x)
        z = loc[..., 2]
        ra = a * p.rv_scale
        rv_center = np.array([a + 0.6 * w, 0.0, -0.36 * L])
        structures = [  # painter's order: later ones cover earlier ones
            (_ellipsoid_sdf(loc - (0, 0, -0.45 * L), (a + w + 28, a + w + 24, 0.5 * L + w + 48)), p.fat_hu, BACKGROUND),
            (_ellipsoid_sdf(loc - rv_center, (1.05 * ra + 4, 1.5 * ra + 4, 0.6 * L + 4)), p.myo_hu, RV_WALL),
            (_ellipsoid_sdf(loc - rv_center, (1.05 * ra, 1.5 * ra, 0.6 * L)), p.rv_blood_hu, RV_BLOOD),
            (np.maximum(_ellipsoid_sdf(loc - (-0.3 * a, -0.4 * a, 24.0), (22.0, 18.0, 15.0)), 3.0 - z), p.blood_hu, LA_BLOOD),
            (_cylinder_sdf(loc, base=(0.45 * a, 0.35 * a, 2.0), axis=(0.35, 0.15, 0.92), radius=12.0, length=38.0), p.blood_hu, AORTA),
            (np.maximum(_ellipsoid_sdf(loc, (a + w, a + w, L + w)), z), p.myo_hu, LV_MYO),
            (np.maximum(_ellipsoid_sdf(loc, (a, a, L)), z), p.blood_hu, LV_BLOOD),
        ]
        hu = np.full(loc.shape[:-1], p.lung_hu, dtype=np.float64)
        labels = np.zeros(loc.shape[:-1], dtype=np.uint8)
        for sdf, value, label in structures:
            m = 0.5 * (1.0 - erf(sdf / (math.sqrt(2.0) * edge_sd_mm)))
            hu += m * (value - hu)
            if label != BACKGROUND:
                labels[sdf <= 0] = label
        return hu, labels


def _cylinder_sdf(loc: np.ndarray, base, axis, radius: float, length: float) -> np.ndarray:
    """Approximate signed distance to a capped cylinder (mm, < 0 inside)."""
    ax = np.asarray(axis, float)
    ax /= np.linalg.norm(ax)
    rel = loc - np.asarray(base, float)
    t = rel @ ax
    radial = np.linalg.norm(rel - t[..., None] * ax, axis=-1) - radius
    caps = np.maximum(-t, t - length)
    return np.maximum(radial, caps)


@dataclass
class PhantomPatient:
    """A rendered phantom patient (canonical RAS arrays).

    Attributes:
        ct: (I, J, K, T) HU, float32.
        labels: (I, J, K, T) uint8 (see LABEL_NAMES).
        flow_ed_from_es: (3, I, J, K) float32 pull field in voxels on the ED grid:
            ED(x) ≈ ES(x + u(x)).
        affine: 4×4 voxel→RAS-mm affine.
        meta: es_phase, ed_phase, EF (measured on the labels and drawn), parameters.
    """

    patient_id: str
    ct: np.ndarray
    labels: np.ndarray
    flow_ed_from_es: np.ndarray
    affine: np.ndarray
    meta: dict


def phantom_affine(grid: int, spacing_mm: float) -> np.ndarray:
    """RAS affine of a cubic phantom grid whose centre voxel sits at world (0, 0, 0)."""
    aff = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    aff[:3, 3] = -spacing_mm * (grid - 1) / 2.0
    return aff


def make_patient(
    index: int,
    seed: int = 0,
    grid: int = 64,
    spacing_mm: float | None = None,
    fov_mm: float = 140.0,
    phases: int = 10,
    noise: bool = True,
    rv_contrast: float = 1.0,
) -> PhantomPatient:
    """Render patient ``index`` of the cohort ``seed``: a pure function of its arguments
    (``rv_contrast``: :func:`draw_params`)."""
    spacing = float(spacing_mm) if spacing_mm else fov_mm / grid
    rng = np.random.default_rng([seed, index])
    params = draw_params(rng, phases, rv_contrast)
    affine = phantom_affine(grid, spacing)
    model = HeartModel(params, center=np.zeros(3))
    ijk = np.stack(np.meshgrid(*(np.arange(grid, dtype=np.float64),) * 3, indexing="ij"), axis=-1)
    y = ijk @ affine[:3, :3].T + affine[:3, 3]
    edge_sd = math.sqrt(params.blur_mm**2 + spacing**2 / 12.0)  # blur + voxel box (anti-aliasing)

    fractions = np.arange(phases) / phases
    fs = contraction(fractions, params.es_fraction)
    es_phase = int(round(params.es_fraction * phases))
    ct = np.empty((grid,) * 3 + (phases,), np.float32)
    labels = np.empty((grid,) * 3 + (phases,), np.uint8)
    for t, f in enumerate(fs):
        hu, lab = model.render(model.material_points(y, float(f)), edge_sd)
        if noise:
            hu = hu + np.random.default_rng([seed, index, 1, t]).normal(0.0, params.noise_sd, hu.shape)
        ct[..., t] = hu
        labels[..., t] = lab

    u_mm = model.displacement(y, float(fs[es_phase]))  # exact: ED(x) = ES(x + u(x))
    flow_vox = np.einsum("ij,...j->i...", np.linalg.inv(affine[:3, :3]), u_mm).astype(np.float32)
    voxel_ml = spacing**3 / 1000.0
    edv = float((labels[..., 0] == LV_BLOOD).sum() * voxel_ml)
    esv = float((labels[..., es_phase] == LV_BLOOD).sum() * voxel_ml)
    meta = {
        "patient_id": f"phantom_{index:03d}",
        "seed": seed,
        "index": index,
        "ed_phase": 0,
        "es_phase": es_phase,
        "phase_percent": [round(100.0 * p, 3) for p in fractions],
        "contraction": [float(f) for f in fs],
        "edv_ml": edv,
        "esv_ml": esv,
        "ef_measured": 1.0 - esv / edv if edv > 0 else float("nan"),
        "ef_drawn": params.ef,
        "grid": grid,
        "spacing_mm": spacing,
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "params": asdict(params),
        "flow_convention": "pull field on the ED grid: ED(x) = ES(x + u(x)); file vectors in RAS mm",
    }
    if rv_contrast != 1.0:  # recorded when set (a default cohort's files are what they were before the key)
        meta["rv_contrast"] = float(rv_contrast)
    return PhantomPatient(meta["patient_id"], ct, labels, flow_vox, affine, meta)


def write_patient(patient: PhantomPatient, out_dir: str | Path) -> Path:
    """Write ``out_dir/<id>/`` (ct, labels, truth flow, meta.json) atomically; returns the folder."""
    from ..fileio import atomic_dir, write_json, write_nifti
    from ..flow.io import write_flow

    final = Path(out_dir) / patient.patient_id
    with atomic_dir(final) as tmp:
        ct = np.clip(np.rint(patient.ct), -1024, 3071).astype(np.int16)
        write_nifti(tmp / PHANTOM_CT, ct, patient.affine)
        write_nifti(tmp / PHANTOM_LABELS, patient.labels, patient.affine)
        write_flow(tmp / PHANTOM_TRUTH_FLOW, patient.flow_ed_from_es, patient.affine)
        write_json(tmp / PHANTOM_META, patient.meta)
    return final


def patient_id(index: int) -> str:
    return f"phantom_{index:03d}"


def is_complete(folder: Path) -> bool:
    """A patient folder is complete when its last-written file exists (writes are atomic anyway)."""
    return all((folder / f).is_file() for f in (PHANTOM_CT, PHANTOM_LABELS, PHANTOM_META, PHANTOM_TRUTH_FLOW))


def _make_and_write(args: tuple) -> str:
    index, seed, grid, spacing_mm, fov_mm, phases, out, rv_contrast = args
    patient = make_patient(index, seed=seed, grid=grid, spacing_mm=spacing_mm, fov_mm=fov_mm, phases=phases,
                           rv_contrast=rv_contrast)
    return str(write_patient(patient, out))


def make_cohort(
    out_dir: str | Path,
    patients: int = 4,
    grid: int = 64,
    spacing_mm: float | None = None,
    fov_mm: float = 140.0,
    phases: int = 10,
    seed: int = 0,
    workers: int | None = None,
    on_patient=None,
    rv_contrast: float = 1.0,
) -> list[Path]:
    """Write a phantom cohort ``out_dir/phantom_000 …`` and return the patient folders.

    Patients already complete are kept (a rerun resumes). Patients are rendered in parallel
    processes; ``on_patient(path)`` is called as each one finishes (for progress bars).
    Existing patients made with another seed, grid, phase count or ``rv_contrast`` are refused.
    """
    from concurrent.futures import ProcessPoolExecutor
    import json
    import os

    from ..errors import InputError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; choose another --out")
    folders = [out / patient_id(i) for i in range(patients)]
    spacing = float(spacing_mm) if spacing_mm else fov_mm / grid
    todo = []
    for i, folder in enumerate(folders):
        if is_complete(folder):
            try:
                meta = json.loads((folder / PHANTOM_META).read_text())
            except ValueError as exc:
                raise InputError(folder / PHANTOM_META, f"unreadable phantom meta.json ({exc}); "
                                                       "delete the folder or choose another --out") from None
            found = {"seed": meta.get("seed"), "grid": meta.get("grid"),
                     "phases": len(meta.get("phase_percent", [])), "spacing_mm": meta.get("spacing_mm"),
                     "rv_contrast": meta.get("rv_contrast", 1.0)}
            wanted = {"seed": seed, "grid": grid, "phases": phases, "spacing_mm": spacing,
                      "rv_contrast": float(rv_contrast)}
            differ = [k for k in wanted if found[k] != wanted[k]]
            if differ:
                made = ", ".join(f"{k}={found[k]:g}" if isinstance(found[k], float) else f"{k}={found[k]}" for k in differ)
                asked = ", ".join(f"{k}={wanted[k]:g}" if isinstance(wanted[k], float) else f"{k}={wanted[k]}" for k in differ)
                raise InputError(folder, f"holds a phantom made with {made}, not {asked}; choose another --out")
            if on_patient:
                on_patient(folder)
        elif folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
            raise InputError(folder, "exists but is not a complete phantom patient (ct.nii.gz, labels.nii.gz, "
                                     "truth/, meta.json); delete it or choose another --out")
        else:
            todo.append((i, seed, grid, spacing_mm, fov_mm, phases, str(out), float(rv_contrast)))
    if todo:
        n = min(len(todo), workers or os.cpu_count() or 1)
        if n == 1:
            for args in todo:
                done = _make_and_write(args)
                if on_patient:
                    on_patient(Path(done))
        else:
            with ProcessPoolExecutor(max_workers=n, mp_context=_pool_context()) as pool:
                for done in pool.map(_make_and_write, todo):
                    if on_patient:
                        on_patient(Path(done))
    return folders


def _pool_context():
    """Worker start method: fork where the OS has it (Python 3.14 makes forkserver the Linux
    default). Fork inherits the imports (no torch re-import per worker) and, unlike spawn or
    forkserver, does not re-run the caller's main script, so a script without an
    ``if __name__ == "__main__"`` guard works; the workers only run numpy and write files."""
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
