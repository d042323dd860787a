"""The pyramid in millimetres: level grids and NCC windows per axis, on anisotropic and oblique grids."""
from __future__ import annotations

import numpy as np
import pytest

from combireg.geometry import Geometry
from combireg.params import default_settings
from combireg.pyramid import odd_window, pyramid_levels, shrink_factors
from tests.conftest import oblique_direction


def _grid(spacing, size=(120, 110, 40)):
    return Geometry(size, origin=(-30.0, 12.0, 5.0), spacing=spacing, direction=tuple(oblique_direction().ravel()))


def test_thick_slice_axis_is_never_shrunk_below_its_own_spacing():
    geometry = _grid((1.0, 1.0, 4.0))
    levels = pyramid_levels(default_settings(), geometry)  # 8, 4, 2 mm
    assert [lvl.factors for lvl in levels] == [(8.0, 8.0, 2.0), (4.0, 4.0, 1.0), (2.0, 2.0, 1.0)]
    finest = levels[-1].geometry
    assert finest.spacing[2] == pytest.approx(4.0, rel=0.02)  # the 4 mm axis keeps its slices
    assert finest.spacing[0] == pytest.approx(2.0, rel=0.02) and finest.spacing[1] == pytest.approx(2.0, rel=0.02)
    # same field of view and orientation on every level
    for lvl in levels:
        assert np.allclose(lvl.geometry.extent_mm, geometry.extent_mm, atol=1e-6)
        assert np.allclose(lvl.geometry.direction, geometry.direction)
        assert np.allclose(lvl.geometry.origin, geometry.origin)


def test_two_mm_image_gets_the_same_physical_levels_as_one_mm():
    coarse = pyramid_levels(default_settings(), _grid((2.0, 2.0, 2.0), size=(60, 55, 50)))
    fine = pyramid_levels(default_settings(), _grid((1.0, 1.0, 1.0), size=(119, 109, 99)))
    for a, b in zip(coarse, fine):
        assert np.allclose(a.geometry.spacing, b.geometry.spacing, rtol=0.05)
    assert coarse[-1].factors == (1.0, 1.0, 1.0)  # 2 mm: the finest level is the image itself


def test_ncc_window_in_mm_per_axis():
    levels = pyramid_levels(default_settings().replace(ncc_window_mm=(40.0, 20.0, 14.0)), _grid((1.0, 1.0, 4.0)))
    # finest level: 2 x 2 x 4 mm voxels -> 7 voxels in-plane (14 mm), 3 across slices (12 mm)
    assert levels[-1].ncc_window == (3, 7, 7)  # (z, y, x)
    assert levels[0].ncc_window == (5, 5, 5)  # 8 mm everywhere -> 40 mm
    assert odd_window(14.0, 4.0) == 3 and odd_window(20.0, 4.0) == 5 and odd_window(1.0, 8.0) == 3


def test_voxel_schedule_keeps_elastix_meaning():
    s = default_settings().replace(pyramid_schedule=((4, 4, 1), (2, 2, 1)), num_levels=2, ncc_window=(5, 7))
    levels = pyramid_levels(s, _grid((1.0, 1.0, 4.0)))
    assert [lvl.factors for lvl in levels] == [(4.0, 4.0, 1.0), (2.0, 2.0, 1.0)]
    assert [lvl.ncc_window for lvl in levels] == [(5, 5, 5), (7, 7, 7)]


def test_shrink_factors_rejects_nonsense():
    assert shrink_factors(3.0, _grid((1.5, 0.5, 6.0))) == (2.0, 6.0, 1.0)
    with pytest.raises(ValueError):
        shrink_factors(0.0, _grid((1.0, 1.0, 1.0)))
