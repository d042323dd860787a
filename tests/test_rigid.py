"""combireg.rigid: the torch rigid pre-alignment recovers known poses in world coordinates."""
import numpy as np
import pytest
import torch

from combireg import Geometry, Image
from combireg.errors import CombiregError
from combireg.rigid import rigid_align, rotation_matrix
from tests.conftest import image_from_world_function, oblique_direction

CENTRE = np.array([4.0, -12.0, 20.0])


def _head(points: np.ndarray) -> np.ndarray:
    """A head-sized, asymmetric phantom in world mm: a soft ellipsoid with inner structure."""
    r = points - CENTRE
    shell = 1.0 / (1.0 + np.exp(((r / np.array([55.0, 65.0, 50.0])) ** 2).sum(-1) * 12.0 - 12.0))
    inner = (0.6 * np.exp(-((r - [20.0, 10.0, 5.0]) ** 2).sum(-1) / (2 * 12.0 ** 2))
             - 0.4 * np.exp(-((r - [-15.0, -25.0, 10.0]) ** 2).sum(-1) / (2 * 9.0 ** 2))
             + 0.25 * np.sin(r[..., 0] / 7.0) * np.cos(r[..., 1] / 9.0))
    return (shell * (1.0 + inner)).astype(np.float32)


def _pose(angle_deg: float, axis, shift_mm) -> np.ndarray:
    """4x4 target -> source map: a rotation about the phantom's centre, then a shift."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    rot = rotation_matrix(torch.as_tensor(np.deg2rad(angle_deg) * axis)).numpy()
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    matrix[:3, 3] = CENTRE - rot @ CENTRE + np.asarray(shift_mm, dtype=np.float64)
    return matrix


def _pair(matrix: np.ndarray, *, contrast=lambda v: v):
    """Source on an oblique 2.5 x 2.2 x 3 mm grid, target(x) = contrast(source(A x)) on a 2 mm grid."""
    source_geometry = Geometry((60, 64, 46), origin=(-70.0, -88.0, -50.0), spacing=(2.5, 2.2, 3.0),
                               direction=tuple(oblique_direction(9.0).ravel()))
    target_geometry = Geometry((70, 80, 66), origin=(72.0, 68.0, -46.0), spacing=(2.0, 2.0, 2.0),
                               direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    source = image_from_world_function(source_geometry, _head)
    target = image_from_world_function(target_geometry, lambda p: contrast(_head(p @ matrix[:3, :3].T + matrix[:3, 3])))
    return source, target


def _error_mm(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance between the two maps' images of points spread over the head."""
    grid = np.stack(np.meshgrid(*[np.linspace(-40.0, 40.0, 5)] * 3, indexing="ij"), -1).reshape(-1, 3) + CENTRE
    return float(np.linalg.norm(grid @ (estimate[:3, :3] - truth[:3, :3]).T + estimate[:3, 3] - truth[:3, 3],
                                axis=1).mean())


def test_rotation_matrix_is_rodrigues():
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    angle = 0.4
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    expected = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    np.testing.assert_allclose(rotation_matrix(torch.as_tensor(angle * axis)).numpy(), expected, atol=1e-12)


def test_recovers_15_degrees_and_15_mm_across_oblique_anisotropic_grids():
    truth = _pose(15.0, (0.4, -0.3, 1.0), (9.0, -9.0, 8.0))
    source, target = _pair(truth)
    assert _error_mm(np.eye(4), truth) > 15.0  # a large pose difference
    estimate = rigid_align(source, target)
    assert _error_mm(estimate, truth) < 0.5
    np.testing.assert_allclose(estimate[:3, :3] @ estimate[:3, :3].T, np.eye(3), atol=1e-9)  # rigid
    np.testing.assert_allclose(estimate[3], (0, 0, 0, 1))


def test_recovers_a_pose_across_contrasts():
    """Mutual information: an inverted, nonlinearly remapped target (another 'sequence')."""
    truth = _pose(10.0, (1.0, 0.2, -0.3), (-6.0, 4.0, 7.0))
    source, target = _pair(truth, contrast=lambda v: (1.4 - v) ** 2 * (v > 0.05))
    assert _error_mm(rigid_align(source, target), truth) < 0.8


def test_is_deterministic_and_uses_only_the_first_channel():
    truth = _pose(6.0, (0.0, 0.0, 1.0), (3.0, 2.0, -1.0))
    source, target = _pair(truth)
    noise = Image(torch.rand_like(source.data), source.geometry)
    two = Image(torch.cat([source.data, noise.data]), source.geometry)
    first = rigid_align(source, target, seed=3)
    np.testing.assert_array_equal(first, rigid_align(two, target, seed=3))


def test_target_mask_restricts_the_samples():
    """Only the masked half of the target counts: the pose is still found from it."""
    truth = _pose(8.0, (0.2, 1.0, 0.0), (5.0, -4.0, 2.0))
    source, target = _pair(truth)
    world = target.geometry.world_grid()
    half = torch.from_numpy((world[..., 0] > CENTRE[0]).astype(np.float32))[None]
    assert _error_mm(rigid_align(source, target, target_mask=Image(half, target.geometry)), truth) < 0.8
    empty = Image(torch.zeros_like(half), target.geometry)
    with pytest.raises(CombiregError, match="mask leaves no voxel"):
        rigid_align(source, target, target_mask=empty)


def test_bad_arguments():
    source, target = _pair(np.eye(4))
    with pytest.raises(TypeError, match="must be an Image"):
        rigid_align(source.data, target)
    with pytest.raises(ValueError, match="one value per level"):
        rigid_align(source, target, spacings_mm=(8.0, 4.0), iterations=(10,))
    with pytest.raises(ValueError, match="> 0"):
        rigid_align(source, target, spacings_mm=(8.0, 0.0))
    constant = Image(torch.ones_like(target.data), target.geometry)
    with pytest.raises(CombiregError, match="constant"):
        rigid_align(source, constant)


def test_noise_does_not_walk_the_source_out_of_the_target(caplog):
    """Tiny noise images give MI nothing to align: the map stays a rigid map that keeps most of
    the target inside the source (the level stops and keeps its best pose when it would not)."""
    geometry = Geometry((12, 10, 8), spacing=(2.0, 2.0, 2.5))
    rng = np.random.default_rng(0)
    source, target = (Image(torch.from_numpy(rng.random(geometry.shape).astype(np.float32))[None], geometry)
                      for _ in range(2))
    matrix = rigid_align(source, target)
    np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-9)
    corners = geometry.index_to_world(np.array([[0, 0, 0], [11, 9, 7]], dtype=float))
    centre = corners.mean(0)
    assert np.linalg.norm(matrix[:3, :3] @ centre + matrix[:3, 3] - centre) < 0.5 * np.linalg.norm(corners[1] - corners[0])


def test_a_source_with_a_smaller_field_of_view_is_aligned(caplog):
    """A source slab covering a third of the target's field of view (most target samples fall
    outside it from the start): the pose is still optimised and found, without a stop."""
    truth = _pose(6.0, (1.0, -0.4, 0.3), (4.0, -3.0, 5.0))
    _, target = _pair(truth)
    slab = Geometry((60, 64, 18), origin=(-70.0, -88.0, 0.0), spacing=(2.5, 2.2, 3.0))
    source = image_from_world_function(slab, _head)
    with caplog.at_level("WARNING", logger="combireg.rigid"):
        estimate = rigid_align(source, target)
    assert not [r for r in caplog.records if "stopped" in r.getMessage()]
    assert _error_mm(estimate, truth) < 1.5
