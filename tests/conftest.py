"""Shared fixtures: tiny volumes on grids with anisotropic spacing and an oblique direction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from combireg import Geometry, Image

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def oblique_direction(angle_deg: float = 17.0) -> np.ndarray:
    """A rotation about an oblique axis (not a permutation or flip)."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@pytest.fixture
def oblique_geometry() -> Geometry:
    """32 x 28 x 24 voxels, spacing 1.5/1.2/2.0 mm, oblique direction, off-centre origin."""
    return Geometry((32, 28, 24), origin=(12.0, -7.5, 30.0), spacing=(1.5, 1.2, 2.0),
                    direction=tuple(oblique_direction().ravel()))


def smooth_pattern(points_lps_mm: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """A smooth, non-symmetric test image defined in world coordinates."""
    r = points_lps_mm - centre
    blob = np.exp(-(r ** 2).sum(-1) / (2 * 14.0 ** 2))
    waves = 0.5 * np.sin(r[..., 0] / 4.0) * np.cos(r[..., 1] / 5.0) * np.sin(r[..., 2] / 6.0 + 0.3)
    return (blob + waves + 0.2 * r[..., 0] / 30.0).astype(np.float32)


def image_from_world_function(geometry: Geometry, func, displacement_lps_mm=None) -> Image:
    """Image whose voxel at world point x holds ``func(x + u(x))``."""
    points = geometry.world_grid()
    if displacement_lps_mm is not None:
        points = points + displacement_lps_mm
    return Image(torch.from_numpy(func(points))[None], geometry)


def known_displacement(geometry: Geometry) -> np.ndarray:
    """A smooth displacement (LPS mm, up to ~2.5 mm) on ``geometry``, (Z, Y, X, 3)."""
    points = geometry.world_grid()
    r = points - points.reshape(-1, 3).mean(0)
    u = np.zeros(points.shape, dtype=np.float32)
    u[..., 0] = 2.0 * np.sin(r[..., 1] / 12.0)
    u[..., 1] = 1.5 * np.cos(r[..., 2] / 10.0)
    u[..., 2] = 1.0
    return u


def itk_warp_with_field(source_path, outdir) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``outdir/field.nii.gz`` to the source with ITK's own DisplacementFieldTransform and
    ResampleImageFilter; return (our warped_0, ITK's result) as arrays on the target grid."""
    import itk

    field = itk.imread(str(outdir / "field.nii.gz"))  # as written: vector float32
    # DisplacementFieldTransform<double> wants double vectors; only the pixel type changes.
    field_d = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    field_d.CopyInformation(field)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field_d)
    moving = itk.imread(str(source_path), itk.F)
    ours = itk.imread(str(outdir / "warped_0.nii.gz"), itk.F)
    theirs = itk.resample_image_filter(moving, transform=transform, use_reference_image=True,
                                       reference_image=ours, default_pixel_value=0.0)
    return itk.array_from_image(ours), itk.array_from_image(theirs)


def maps_inside(displacement_lps_mm: np.ndarray, target_geometry: Geometry, source_geometry: Geometry,
                margin: float = 1.0) -> np.ndarray:
    """(Z, Y, X) bool on the target grid: where x + u(x) lies ``margin`` voxels inside the source
    grid (where two resamplers agree whatever they do at the border)."""
    points = (target_geometry.world_grid() + displacement_lps_mm).reshape(-1, 3)
    index = source_geometry.world_to_index(points)
    upper = np.asarray(source_geometry.size) - 1 - margin
    return np.all((index >= margin) & (index <= upper), axis=1).reshape(target_geometry.shape)


def check_itk_reproduces_warped(tmp_path, source: Image, result):
    """Save ``result`` and check that ITK's resampler with its ``field.nii.gz`` gives ``warped_0``
    wherever x + u(x) lies a voxel inside the source (a posed source leaves its grid elsewhere,
    and the two resamplers treat the border differently); returns the output folder."""
    from combireg import io

    src_path = tmp_path / "src.nii.gz"
    io.write_image(src_path, Image(source.data[:1], source.geometry))
    out = result.save(tmp_path / "out")
    ours, theirs = itk_warp_with_field(src_path, out)
    inside = maps_inside(result.displacement_lps_mm, result.target_geometry, source.geometry)
    assert inside.mean() > 0.5
    assert np.abs(ours[inside] - theirs[inside]).max() < 1e-3 * np.abs(ours).max()
    return out


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (restored afterwards)."""
    from combireg.optimize import torch_threads

    with torch_threads(1):
        yield
