import numpy as np
import pytest
import torch

from combireg import Geometry
from combireg import warp
from tests.conftest import image_from_world_function, known_displacement, smooth_pattern


def _pattern(geometry):
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    return lambda p: smooth_pattern(p, centre)


def test_mm_normalised_round_trip(oblique_geometry):
    u = known_displacement(oblique_geometry)
    n = warp.lps_mm_to_normalised(u, oblique_geometry)
    assert n.shape == (1, 3) + oblique_geometry.shape
    np.testing.assert_allclose(warp.normalised_to_lps_mm(n, oblique_geometry), u, atol=1e-5)


def test_normalised_translation_is_world_translation(oblique_geometry):
    # One voxel along grid axis x in normalised units is spacing_x mm along direction column 0.
    g = oblique_geometry
    n = torch.zeros((1, 3) + g.shape)
    n[:, 0] = 2.0 / (g.size[0] - 1)
    u = warp.normalised_to_lps_mm(n, g)
    np.testing.assert_allclose(u[3, 4, 5], g.direction_matrix[:, 0] * g.spacing[0], atol=1e-5)


def test_warp_image_matches_analytic(oblique_geometry):
    g = oblique_geometry
    func = _pattern(g)
    source = image_from_world_function(g, func)
    u = known_displacement(g)
    warped = warp.warp_image(source, g, u)
    expected = image_from_world_function(g, func, u).numpy()[0]
    inner = (slice(3, -3),) * 3
    # trilinear interpolation error of a smooth pattern at this resolution
    assert np.abs(warped.numpy()[0][inner] - expected[inner]).max() < 0.05


def test_resample_between_grids_in_world_coordinates(oblique_geometry):
    other = Geometry((30, 30, 30), origin=(0.0, -20.0, 10.0), spacing=(1.3, 1.3, 1.3))
    func = _pattern(oblique_geometry)
    source = image_from_world_function(other, func)
    resampled = warp.resample_image(source, oblique_geometry)
    expected = image_from_world_function(oblique_geometry, func).numpy()[0]
    # compare where the oblique grid lies inside the other grid
    idx = other.world_to_index(oblique_geometry.world_grid().reshape(-1, 3))
    inside = other.contains_index(idx, tol=-1.0).reshape(oblique_geometry.shape)
    assert inside.sum() > 1000
    assert np.abs(resampled.numpy()[0][inside] - expected[inside]).max() < 0.05


def test_invert_normalised(oblique_geometry):
    u = known_displacement(oblique_geometry)
    n = warp.lps_mm_to_normalised(u, oblique_geometry)
    inv = warp.invert_normalised(n)
    residual = n + warp.warp_normalised(inv, n)
    residual_mm = warp.normalised_to_lps_mm(residual, oblique_geometry)
    assert np.abs(residual_mm[3:-3, 3:-3, 3:-3]).max() < 0.05


def test_jacobian_of_known_fields(oblique_geometry):
    g = oblique_geometry
    # translation: det 1 everywhere
    u = np.zeros(g.shape + (3,), np.float32) + np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(warp.jacobian_determinant(u, g), 1.0, atol=1e-5)
    # uniform scaling by 1.1 about the origin in world coordinates: det 1.331
    u = (0.1 * g.world_grid()).astype(np.float32)
    np.testing.assert_allclose(warp.jacobian_determinant(u, g), 1.331, rtol=1e-4)


def test_gradient_scale_is_resolution_independent(oblique_geometry):
    from combireg.losses import gradient_regulariser

    g = oblique_geometry
    coarse = g.shrink((2, 2, 2))
    values = []
    for geom in (g, coarse):
        # a linear world field u = 0.05 * x_world has |grad u|^2 = 3 * 0.05^2 whatever the grid
        u = (0.05 * (geom.world_grid() - np.asarray(geom.origin))).astype(np.float32)
        n = warp.lps_mm_to_normalised(u, geom)
        values.append(float(gradient_regulariser(n, warp.gradient_scale(geom))))
    assert values[0] == pytest.approx(3 * 0.05 ** 2, rel=1e-3)
    assert values[1] == pytest.approx(values[0], rel=1e-3)


def test_resample_field_matches_world_coordinate_sampling(oblique_geometry):
    """The affine_grid fast path equals sampling at float64 world points of every voxel."""
    from tests.conftest import oblique_direction

    # a coarse grid with the oblique grid's field of view (first and last voxel centres kept)
    size = (7, 9, 8)
    spacing = np.asarray(oblique_geometry.extent_mm) / (np.asarray(size) - 1)
    grid = Geometry(size, oblique_geometry.origin, tuple(spacing), oblique_geometry.direction)
    field = torch.randn(8, 9, 7, 3, generator=torch.Generator().manual_seed(1)).numpy()
    other = Geometry((21, 17, 19), origin=(0.0, -10.0, 25.0), spacing=(2.1, 1.9, 2.3),
                     direction=tuple(oblique_direction(40.0).ravel()))
    for destination in (oblique_geometry, other):  # same field of view (up-sampling), and another grid
        reference = warp.sample_field_at(field, grid, destination, np.zeros(destination.shape + (3,)))
        np.testing.assert_allclose(warp.resample_field(field, grid, destination), reference, atol=2e-5)
    assert warp.same_field_of_view(grid, oblique_geometry) and not warp.same_field_of_view(grid, other)


def _world_point_warp(source, geometry, u=None, padding_mode="zeros"):
    """The reference: float64 world coordinates of every voxel (+ u), mapped to the source's
    normalised coordinates in float64, then grid_sample (what warp_image did before affine_grid)."""
    points = geometry.world_grid() + (0.0 if u is None else np.asarray(u, np.float64))
    w2n = source.geometry.world_to_normalised_matrix
    grid = torch.from_numpy((points @ w2n[:3, :3].T + w2n[:3, 3]).astype(np.float32))[None]
    return torch.nn.functional.grid_sample(source.data[None], grid, mode="bilinear", padding_mode=padding_mode,
                                           align_corners=True)[0].numpy()


def test_warp_and_resample_equal_float64_world_point_sampling(oblique_geometry):
    """The affine_grid sampling grid equals float64 world points of every voxel within float32 noise:
    oblique anisotropic grids on both sides, another field of view, a displacement, and zeros/border."""
    from tests.conftest import oblique_direction

    other = Geometry((26, 23, 29), origin=(4.0, -15.0, 22.0), spacing=(1.7, 1.1, 1.4),
                     direction=tuple(oblique_direction(-31.0).ravel()))
    source = image_from_world_function(other, _pattern(other))
    u = known_displacement(oblique_geometry)
    scale = float(np.abs(source.numpy()).max())
    for padding in ("zeros", "border"):
        ours = warp.warp_image(source, oblique_geometry, u, padding_mode=padding).numpy()
        np.testing.assert_allclose(ours, _world_point_warp(source, oblique_geometry, u, padding), atol=1e-5 * scale)
    ours = warp.resample_image(source, oblique_geometry).numpy()
    np.testing.assert_allclose(ours, _world_point_warp(source, oblique_geometry), atol=1e-5 * scale)
    # a plain up-sampling grid (size-1 axes map to normalised 0 on both sides)
    flat = Geometry((12, 10, 1), origin=(1.0, 2.0, 3.0), spacing=(1.0, 1.5, 2.0))
    flat_source = image_from_world_function(flat, _pattern(flat))
    onto = Geometry((23, 19, 1), origin=(1.0, 2.0, 3.0), spacing=(0.5, 0.75, 2.0))
    np.testing.assert_allclose(warp.resample_image(flat_source, onto).numpy(), _world_point_warp(flat_source, onto),
                               atol=1e-5 * float(np.abs(flat_source.numpy()).max()))


def test_jacobian_in_slabs_equals_whole_array_differences(oblique_geometry):
    """Slab by slab (seams included: 24 z-slices are three slabs) the determinant and the
    statistics are bit-identical to np.gradient and np.linalg.norm over the whole field."""
    g = oblique_geometry
    u = (known_displacement(g) * 3 + np.random.default_rng(2).normal(size=g.shape + (3,))).astype(np.float32)
    inv = np.linalg.inv(g.index_to_world_linear).astype(np.float32)
    d = [[np.gradient(u[..., c], axis=2 - a) for a in range(3)] for c in range(3)]
    j = [[sum(d[c][a] * inv[a, w] for a in range(3)) + (1.0 if c == w else 0.0) for w in range(3)] for c in range(3)]
    expected = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    assert g.shape[0] > 2 * warp._JACOBIAN_SLAB
    np.testing.assert_array_equal(warp.jacobian_determinant(u, g), expected)
    stats = warp.field_statistics(u, g)
    norm = np.linalg.norm(u, axis=-1)
    assert stats["jacobian"] == {"min": float(expected.min()), "max": float(expected.max()),
                                 "percent_nonpositive": float(100.0 * np.count_nonzero(expected <= 0) / expected.size)}
    assert stats["jacobian"]["percent_nonpositive"] > 0
    assert stats["displacement_mm"] == {"max": float(norm.max()), "mean": float(norm.mean())}


def _posed_affine() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", [3.0, -12.0, 7.0], degrees=True).as_matrix() * 1.05
    matrix[:3, 3] = [3.0, -7.0, 12.0]
    return matrix


def test_affine_fields_match_world_coordinates_on_oblique_anisotropic_grids():
    """u(x) = A x - x and A (x + u(x)) - x, evaluated without world grids, equal the float64
    world-coordinate formulas (a grid with one voxel along an axis included)."""
    from tests.conftest import oblique_direction

    matrix = _posed_affine()
    for geometry in (Geometry((37, 1, 23), (96.0, 132.0, -78.0), (1.2, 0.8, 3.0), tuple(oblique_direction().ravel())),
                     Geometry((20, 24, 18), (96.0, 132.0, -78.0), (1.0, 1.1, 2.5), (-1, 0, 0, 0, -1, 0, 0, 0, 1))):
        points = geometry.world_grid()
        expected = points @ matrix[:3, :3].T + matrix[:3, 3] - points
        np.testing.assert_allclose(warp.affine_displacement(matrix, geometry), expected, atol=2e-5)
        u = np.random.default_rng(1).normal(size=points.shape).astype(np.float32)
        composed = (points + u) @ matrix[:3, :3].T + matrix[:3, 3] - points
        np.testing.assert_allclose(warp.compose_affine(matrix, u, geometry), composed, atol=3e-5)


def test_warp_image_affine_samples_the_source_at_a_x():
    from combireg import Image
    from tests.conftest import oblique_direction

    matrix = _posed_affine()
    source_geometry = Geometry((40, 36, 30), (-30.0, -25.0, -20.0), (1.5, 1.6, 2.0), tuple(oblique_direction(9.0).ravel()))
    target_geometry = Geometry((30, 32, 20), (-20.0, -22.0, -15.0), (1.7, 1.3, 2.2))
    centre = source_geometry.world_grid().reshape(-1, 3).mean(0)
    source = image_from_world_function(source_geometry, lambda p: smooth_pattern(p, centre))
    moved = warp.warp_image_affine(Image(torch.cat([source.data, 2 * source.data]), source_geometry),
                                   target_geometry, matrix)
    via_field = warp.warp_image(source, target_geometry, warp.affine_displacement(matrix, target_geometry))
    assert moved.geometry == target_geometry and moved.data.shape[0] == 2
    torch.testing.assert_close(moved.data[:1], via_field.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(moved.data[1:], 2 * via_field.data, atol=2e-5, rtol=0)
    # inside the source, the value at x is the pattern at A x (linear interpolation error only)
    points = target_geometry.world_grid() @ matrix[:3, :3].T + matrix[:3, 3]
    inside = np.all(np.abs(source_geometry.world_to_index(points.reshape(-1, 3))
                           - (np.asarray(source_geometry.size) - 1) / 2) < (np.asarray(source_geometry.size) - 1) / 2 - 1, axis=1)
    exact = smooth_pattern(points.reshape(-1, 3), centre)
    assert inside.sum() > 1000
    assert np.abs(moved.data[0].numpy().reshape(-1)[inside] - exact[inside]).mean() < 0.02


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_grid_sample_3d_in_slabs_equals_one_call(threads, monkeypatch):
    # The slabs (one per thread, the last padded) must give grid_sample's values and gradients.
    import torch.nn.functional as F

    monkeypatch.setattr(warp, "_SLAB_MIN_VOXELS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 2, 9, 10, 11, generator=generator, requires_grad=True)
    grid = (warp.identity_grid((7, 8, 6)) + 0.3 * torch.rand(1, 7, 8, 6, 3, generator=generator) - 0.15).requires_grad_(True)
    for mode, padding in (("bilinear", "border"), ("nearest", "zeros")):
        ours = warp.grid_sample_3d(image, grid, mode=mode, padding_mode=padding)
        reference = F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
        assert torch.equal(ours, reference)
    weights = torch.rand(ours.shape, generator=generator)
    ours = warp.grid_sample_3d(image, grid)
    grads = torch.autograd.grad((ours * weights).sum(), (image, grid))
    reference = F.grid_sample(image, grid, padding_mode="border", align_corners=True)
    expected = torch.autograd.grad((reference * weights).sum(), (image, grid))
    torch.testing.assert_close(grads[0], expected[0], atol=1e-6, rtol=0)
    assert torch.equal(grads[1], expected[1])


def test_affine_grid_is_torch_affine_grid_in_float64(oblique_geometry):
    import torch.nn.functional as F

    theta = np.random.default_rng(5).normal(size=(3, 4))
    for shape in ((13, 17, 11), (1, 9, 4), (6, 1, 1)):
        ours = warp._affine_grid(theta, shape)
        exact = F.affine_grid(torch.as_tensor(theta[None]), (1, 1) + shape, align_corners=True)
        assert ours.dtype == torch.float32 and ours.shape == (1,) + shape + (3,)
        torch.testing.assert_close(ours.double(), exact, atol=4e-7, rtol=0)
