"""(Transform "Diffeomorphic"): the exponential of a stationary velocity in combireg.warp, its use
in combireg.optimize and combireg.api, the parameter keys and their documentation."""
import numpy as np
import pytest
import torch
from scipy.linalg import expm

from combireg import warp
from combireg.errors import CombiregError
from combireg.paramfile import parse_text
from combireg.params import default_parameter_map, default_parameter_text, default_settings, settings_from_map
from tests.conftest import known_displacement


def _interior(a, m=3):
    return a[m:-m, m:-m, m:-m]


def _mm(field, geometry):
    return warp.normalised_to_lps_mm(field, geometry)


# ------------------------------------------------------------------ the exponential in warp.py
def test_exp_of_a_linear_velocity_is_the_matrix_exponential(oblique_geometry):
    """v(x) = A (x - c) is linear (trilinear interpolation is exact), so exp(v) = expm(A) (x - c) - (x - c),
    and scaling and squaring's error falls by 4 with each step (first order in v / 2^N)."""
    g = oblique_geometry
    centre = g.world_grid().reshape(-1, 3).mean(0)
    a = np.array([[0.0, -0.24, 0.06], [0.24, 0.04, 0.0], [-0.06, 0.0, -0.08]])  # a rotation, a stretch
    r = g.world_grid() - centre
    velocity = warp.lps_mm_to_normalised((r @ a.T).astype(np.float32), g)
    expected = r @ expm(a).T - r
    # near the centre: points that flow out of the grid see its border value, not the linear field
    near = np.linalg.norm(r, axis=-1) < 10.0
    assert np.linalg.norm(expected, axis=-1)[near].max() > 2.5
    errors = [np.abs(_mm(warp.exp_velocity(velocity, steps), g) - expected)[near].max() for steps in (0, 2, 4, 6)]
    assert errors[0] > 0.25  # mm: the velocity alone is not the map (measured 0.31, 0.076, 0.019, 0.0047)
    assert errors[3] < 0.006
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < 0.3 * coarse


def test_exp_of_a_smooth_velocity_matches_the_integrated_flow(oblique_geometry):
    """Flow of dx/dt = v(x) from each grid point for t in [0, 1], integrated with RK4 on the
    analytic velocity, against scaling and squaring on the grid."""
    g = oblique_geometry
    centre = g.world_grid().reshape(-1, 3).mean(0)

    def v(p):
        r = p - centre
        return np.stack([4.0 * np.sin(r[..., 1] / 9.0), 3.0 * np.cos(r[..., 2] / 8.0) * np.exp(-(r ** 2).sum(-1) / 800.0),
                         2.0 + np.sin(r[..., 0] / 10.0)], axis=-1)

    points = g.world_grid()
    flow = points.copy()
    h = 1.0 / 64
    for _ in range(64):
        k1 = v(flow)
        k2 = v(flow + h / 2 * k1)
        k3 = v(flow + h / 2 * k2)
        k4 = v(flow + h * k3)
        flow = flow + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    expected = flow - points
    exp = _mm(warp.exp_velocity(warp.lps_mm_to_normalised(v(points).astype(np.float32), g), 7), g)
    error = np.linalg.norm(exp - expected, axis=-1)
    plain = np.linalg.norm(v(points) - expected, axis=-1)
    assert np.linalg.norm(expected, axis=-1).max() > 5.0
    assert _interior(error, 4).max() < 0.06  # mm (trilinear interpolation of the velocity); measured 0.043
    assert _interior(plain, 4).max() > 0.5  # the velocity alone is not the map; measured 0.66


def test_exp_of_the_negated_velocity_is_the_inverse(oblique_geometry):
    g = oblique_geometry
    velocity = warp.lps_mm_to_normalised(known_displacement(g), g)
    forward, backward = warp.exp_velocity(velocity, 7), warp.exp_velocity(-velocity, 7)
    for first, second in ((forward, backward), (backward, forward)):
        residual = _mm(first + warp.warp_normalised(second, first), g)
        assert np.abs(_interior(residual)).max() < 0.03  # mm; the maps move up to 3 mm
    assert np.linalg.norm(_mm(forward, g), axis=-1).max() > 2.5


def test_log_displacement_is_the_inverse_of_exp(oblique_geometry):
    g = oblique_geometry
    u = known_displacement(g)
    velocity, residual = warp.log_displacement(warp.lps_mm_to_normalised(u, g), 7)
    exp = _mm(warp.exp_velocity(velocity, 7), g)
    assert np.abs(exp - u).max() < 0.01  # mm
    np.testing.assert_allclose(_mm(residual, g), exp - u, atol=1e-5)
    assert np.abs(_mm(velocity, g) - u).max() > 0.05  # the velocity is not the displacement


def test_squaring_steps_fixed_and_automatic(oblique_geometry):
    g = oblique_geometry
    velocity = warp.lps_mm_to_normalised(3.0 * known_displacement(g), g)
    assert warp.squaring_steps(velocity, 7) == 7
    steps = warp.squaring_steps(velocity)
    bound = max(warp.max_voxel_norm(velocity), warp.max_jacobian_row_sum(velocity))
    assert bound / 2 ** steps <= warp.FIRST_STEP_VOXELS < bound / 2 ** (steps - 1)
    assert warp.squaring_steps(torch.zeros_like(velocity)) == 1
    # one voxel along x in normalised units is 2 / (n_x - 1)
    one_voxel = torch.zeros((1, 3) + g.shape)
    one_voxel[:, 0] = 2.0 / (g.size[0] - 1)
    assert warp.max_voxel_norm(one_voxel) == pytest.approx(1.0)


# ------------------------------------------------------------------ parameter keys
def _parse(text):
    return settings_from_map(parse_text(text, source="p.txt"))


def test_transform_keys_are_read_and_round_trip():
    s = _parse('(Transform "Diffeomorphic")\n(NumberOfSquaringSteps 7)')
    assert s.transform == "Diffeomorphic" and s.diffeomorphic and s.squaring_steps == 7
    assert settings_from_map(s.to_parameter_map()) == s
    default = default_settings()
    assert default.transform == "Displacement" and not default.diffeomorphic and default.squaring_steps == 0
    # the default map (and so every Displacement params.txt) does not list them ...
    assert "Transform" not in default_parameter_map() and "NumberOfSquaringSteps" not in default_parameter_map()
    # ... and `combireg params defaults` shows them commented out
    text = default_parameter_text()
    assert '// (Transform "Displacement")' in text and "// (NumberOfSquaringSteps 0)" in text
    assert _parse('(Transform "Displacement")') == default


def test_squaring_step_limit_agrees_with_warp():
    from combireg import params

    assert params.MAX_SQUARING_STEPS == warp.MAX_SQUARING_STEPS


@pytest.mark.parametrize(("text", "message"), [
    ('(Transform "SVF")', "p.txt:1: Transform expects one of 'Displacement', 'Diffeomorphic', got 'SVF'"),
    ('(Seed 1)\n(Transform "Displacement" "Diffeomorphic")', "p.txt:2: Transform expects exactly 1 value, got 2"),
    ("(NumberOfSquaringSteps 21)", "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '21'"),
    ("(NumberOfSquaringSteps -1)", "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '-1'"),
    ("(NumberOfSquaringSteps 7.5)", "p.txt:1: NumberOfSquaringSteps expects an integer >= 0 and <= 20, got '7.5'"),
    ('(Transfrom "Diffeomorphic")', "p.txt:1: unknown key 'Transfrom' (did you mean 'Transform'?)"),
])
def test_transform_key_errors(text, message):
    with pytest.raises(CombiregError) as info:
        _parse(text)
    assert str(info.value) == message
