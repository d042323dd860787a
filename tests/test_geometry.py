import numpy as np
import pytest

from combireg import Geometry
from tests.conftest import oblique_direction


def test_index_world_round_trip(oblique_geometry):
    rng = np.random.default_rng(0)
    index = rng.uniform(-2, 30, size=(50, 3))
    world = oblique_geometry.index_to_world(index)
    np.testing.assert_allclose(oblique_geometry.world_to_index(world), index, atol=1e-9)


def test_index_to_world_matches_itk_formula(oblique_geometry):
    g = oblique_geometry
    d = g.direction_matrix
    idx = np.array([3.0, 5.0, 7.0])
    expected = np.asarray(g.origin) + d @ (np.asarray(g.spacing) * idx)
    np.testing.assert_allclose(g.index_to_world(idx[None])[0], expected, atol=1e-12)


def test_world_grid_corners(oblique_geometry):
    g = oblique_geometry
    grid = g.world_grid()
    assert grid.shape == g.shape + (3,)
    np.testing.assert_allclose(grid[0, 0, 0], g.origin)
    last = g.index_to_world(np.asarray(g.size, dtype=float)[None] - 1)[0]
    np.testing.assert_allclose(grid[-1, -1, -1], last, atol=1e-9)
    # array axis 2 is x: one step along it moves by spacing_x along direction column 0
    np.testing.assert_allclose(grid[0, 0, 1] - grid[0, 0, 0], g.direction_matrix[:, 0] * g.spacing[0], atol=1e-12)


def test_normalised_corners(oblique_geometry):
    g = oblique_geometry
    m = g.world_to_normalised_matrix
    first = m @ np.r_[g.origin, 1.0]
    last = m @ np.r_[g.index_to_world(np.asarray(g.size, float)[None] - 1)[0], 1.0]
    np.testing.assert_allclose(first[:3], [-1, -1, -1], atol=1e-9)
    np.testing.assert_allclose(last[:3], [1, 1, 1], atol=1e-9)


def test_shrink_keeps_extent_and_corners(oblique_geometry):
    g = oblique_geometry
    s = g.shrink((2, 2, 4))
    assert s.size == (16, 14, 6)
    np.testing.assert_allclose(s.extent_mm, g.extent_mm, atol=1e-9)
    np.testing.assert_allclose(s.origin, g.origin)
    np.testing.assert_allclose(s.direction, g.direction)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": (0, 4, 4)}, "size must be positive"),
    ({"size": (4, 4, 4), "spacing": (1, -1, 1)}, "spacing must be positive"),
    ({"size": (4, 4, 4), "direction": (1, 0, 0, 1, 0, 0, 0, 0, 1)}, "singular"),
    ({"size": (4, 4)}, "size must have 3 values"),
])
def test_invalid_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Geometry(**kwargs)


def test_oblique_direction_is_rotation():
    d = oblique_direction()
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(d) == pytest.approx(1.0)
