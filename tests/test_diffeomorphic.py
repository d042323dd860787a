"""(Transform "Diffeomorphic"): the exponential of a stationary velocity in combireg.warp and its use
in combireg.optimize and combireg.api (the keys are tested in test_params)."""
import json

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from combireg import Geometry, warp
from combireg.api import register
from combireg.landmarks import sample_displacement
from combireg.optimize import optimise_fields
from combireg.params import default_settings
from combireg.warp import jacobian_determinant
from tests.conftest import image_from_world_function, known_displacement, oblique_direction, smooth_pattern


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


# ------------------------------------------------------------------ registration
def _settings(**changes):
    base = dict(num_levels=2, iterations=(150, 100), learning_rate=(0.02, 0.01), regularization_weight=(0.05, 0.05),
                pyramid_schedule=((2, 2, 2), (1, 1, 1)), ncc_window=(5, 5), bidirectional=False,
                inverse_consistency_weight=0.0, transform="Diffeomorphic",
                # the engine on its own: these phantoms have no pose to correct
                pre_alignment="none")
    base.update(changes)
    return default_settings().replace(**base)


@pytest.fixture(scope="module")
def problem():
    """The registration tests' problem: a smooth pattern under a known field of up to 2.5 mm on an
    oblique 32x28x24 grid with 1.5/1.2/2.0 mm voxels."""
    geometry = Geometry((32, 28, 24), origin=(12.0, -7.5, 30.0), spacing=(1.5, 1.2, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    u_true = known_displacement(geometry)
    source = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre))
    target = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre), u_true)
    return source, target, u_true


@pytest.fixture(scope="module")
def result(problem):
    source, target, _ = problem
    return register(source, target, _settings())


def _round_trip_error(result, step=3, margin=4):
    """|x -> forward -> inverse - x| (mm) at target grid points (the written fields)."""
    g = result.target_geometry
    points = g.world_grid()[margin:-margin:step, margin:-margin:step, margin:-margin:step].reshape(-1, 3)
    mapped = points + sample_displacement(result.displacement_lps_mm, g, points)
    back = mapped + sample_displacement(result.inverse_displacement_lps_mm, result.source_geometry, mapped)
    return np.linalg.norm(back - points, axis=-1), np.linalg.norm(mapped - points, axis=-1)


def test_diffeomorphic_recovers_a_known_displacement_without_folding(problem, result):
    _, target, u_true = problem
    error = np.linalg.norm(result.displacement_lps_mm - u_true, axis=-1)
    half_voxel = 0.5 * min(target.geometry.spacing)
    assert _interior(np.linalg.norm(u_true, axis=-1)).mean() > 1.5
    assert _interior(error).mean() < half_voxel  # measured 0.19 mm (0.20 mm for Displacement)
    assert np.percentile(_interior(error), 90) < half_voxel
    jac = jacobian_determinant(result.displacement_lps_mm, target.geometry)
    assert jac[1:-1, 1:-1, 1:-1].min() > 0.3 and result.report["jacobian"]["percent_nonpositive"] == 0.0


def test_written_inverse_undoes_the_forward_map(result):
    back, moved = _round_trip_error(result)
    assert moved.mean() > 1.5
    assert back.mean() < 0.05 and back.max() < 0.15  # mm; measured 0.01 / 0.05 (exp(-v), not a fit)


def test_report_and_params_record_the_model(tmp_path, result):
    rep = result.report
    assert rep["transform"] == "Diffeomorphic"
    steps = rep["squaring_steps"]
    assert 1 <= steps <= warp.MAX_SQUARING_STEPS and rep["velocity"]["squaring_steps_setting"] == "automatic"
    assert rep["velocity"]["first_step_voxels"] <= warp.FIRST_STEP_VOXELS
    assert all(1 <= level["squaring_steps"] <= 20 for level in rep["levels"])
    out = result.save(tmp_path / "out")
    written = json.loads((out / "report.json").read_text())
    assert written["transform"] == "Diffeomorphic" and written["squaring_steps"] == steps
    text = (out / "params.txt").read_text()
    assert '(Transform "Diffeomorphic")' in text and "(NumberOfSquaringSteps 0)" in text
    from combireg.params import load_settings

    assert load_settings(out / "params.txt") == result.settings


def test_displacement_report_names_its_model(problem):
    source, target, _ = problem
    rep = register(source, target, _settings(transform="Displacement", iterations=(2, 2))).report
    assert rep["transform"] == "Displacement" and "squaring_steps" not in rep and "velocity" not in rep
    assert "squaring_steps" not in rep["levels"][0]


def _swirl_problem():
    """A 7 mm swirl (rotation by up to 90 degrees about world z, fading with a 8 mm Gaussian)
    of a textured pattern on an oblique, anisotropic grid: a large, smooth, invertible map."""
    geometry = Geometry((32, 28, 24), origin=(12.0, -7.5, 30.0), spacing=(1.5, 1.2, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    r = geometry.world_grid() - centre
    theta = np.deg2rad(90.0) * np.exp(-(r ** 2).sum(-1) / (2 * 8.0 ** 2))
    moved = r.copy()
    moved[..., 0] = np.cos(theta) * r[..., 0] - np.sin(theta) * r[..., 1]
    moved[..., 1] = np.sin(theta) * r[..., 0] + np.cos(theta) * r[..., 1]
    u_true = (moved - r).astype(np.float32)
    source = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre))
    target = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre), u_true)
    return source, target, u_true


def test_large_deformation_folds_as_displacement_but_not_as_diffeomorphic():
    source, target, u_true = _swirl_problem()
    geometry = target.geometry
    assert np.linalg.norm(u_true, axis=-1).max() > 7.0 and jacobian_determinant(u_true, geometry).min() > 0.9
    folded = {}
    for model in ("Displacement", "Diffeomorphic"):
        # almost no regulariser: the default's bending term would keep the displacement from folding
        res = register(source, target,
                       _settings(transform=model, regularization_weight=(0.001,), bending_weight=(0.0,)))
        jac = jacobian_determinant(res.displacement_lps_mm, geometry)[1:-1, 1:-1, 1:-1]
        folded[model] = (int((jac <= 0).sum()), float(jac.min()))
    # measured: Displacement folds 22 interior voxels (det down to -1.1), Diffeomorphic none (min 0.37)
    assert folded["Displacement"][0] >= 5 and folded["Displacement"][1] < 0
    assert folded["Diffeomorphic"][0] == 0 and folded["Diffeomorphic"][1] > 0.1


def test_fixed_squaring_steps(problem):
    source, target, _ = problem
    res = register(source, target, _settings(squaring_steps=5, iterations=(20, 10)))
    assert res.report["squaring_steps"] == 5 and res.report["velocity"]["squaring_steps_setting"] == "fixed"
    assert [level["squaring_steps"] for level in res.report["levels"]] == [5, 5]


def test_bidirectional_velocities_and_correspondence_weighting(problem):
    """A forward and a backward velocity are optimised (their maps give the correspondence
    weight); the inverse handed back is exp(-v_f) whatever v_b became."""
    source, target, u_true = problem
    s = _settings(bidirectional=True, inverse_consistency_weight=0.1, correspondence_weighting=True,
                  iterations=(60, 40))
    src, tgt = source.data[None], target.data[None]
    fields = optimise_fields(src, tgt, target.geometry, s)
    steps = fields.transform["squaring_steps"]
    assert torch.equal(fields.forward, warp.exp_velocity(fields.velocity, steps))
    assert torch.equal(fields.backward, warp.exp_velocity(-fields.velocity, steps))
    weight = fields.correspondence_weight
    # against exp(-v_f) the error would be ~0.01 mm and the weight exactly 1 in float32
    assert weight is not None and 0.9 < float(weight.mean()) <= 1.0 and float(weight.min()) < 1.0
    error = np.linalg.norm(_mm(fields.forward, fields.geometry) - u_true, axis=-1)
    assert fields.geometry.same_grid(target.geometry)
    assert _interior(error).mean() < 0.5 * min(target.geometry.spacing)


def test_mask_with_diffeomorphic():
    """The masked lesion problem of test_registration: inside the masked-out ball the map follows
    its surroundings (the constant shift)."""
    from tests.test_registration import _lesion_problem

    source, target, mask, shift, inside = _lesion_problem("target")
    s = _settings(regularization_weight=(1.0, 1.0))
    masked = register(source, target, s, target_mask=mask)
    assert np.linalg.norm(masked.displacement_lps_mm - shift, axis=-1)[inside].mean() < 0.35


def test_initial_field_becomes_a_velocity(problem):
    """With zero iterations the written field is exp(log(init)): the initial field itself."""
    source, target, u_true = problem
    res = register(source, target, _settings(iterations=(0, 0)), init=(u_true, target.geometry))
    assert np.abs(res.displacement_lps_mm - u_true).max() < 0.05
    residual = res.report["velocity"]["init_log_residual_mm"]["forward"]
    assert residual["max"] < 0.05 and residual["mean"] < 0.01
    back, _ = _round_trip_error(res)
    assert back.mean() < 0.05


def test_drn_init_with_diffeomorphic(oblique_geometry):
    """A DRN's predicted displacements (here a constant translation d) start a Diffeomorphic run."""
    from combireg.network import DrnModel, internal_geometry
    from combireg.warp import normalised_per_mm
    from tests.test_network import _ConstantNet

    g = oblique_geometry
    centre = g.world_grid().reshape(-1, 3).mean(0)
    d = np.array([2.0, -1.0, 1.5])
    target = image_from_world_function(g, lambda p: smooth_pattern(p, centre))
    source = image_from_world_function(g, lambda p: smooth_pattern(p - d, centre))
    shape = (10, 12, 14)
    to_norm = normalised_per_mm(internal_geometry(g, shape))
    model = DrnModel(_ConstantNet(to_norm @ d, to_norm @ -d), shape, (0.0, 100.0))
    for bidirectional in (False, True):
        res = register(source, target, _settings(iterations=(0, 0), bidirectional=bidirectional), init=model)
        np.testing.assert_allclose(res.displacement_lps_mm, np.broadcast_to(d, res.displacement_lps_mm.shape),
                                   atol=1e-3)
        np.testing.assert_allclose(res.inverse_displacement_lps_mm, np.broadcast_to(-d, res.displacement_lps_mm.shape),
                                   atol=1e-3)
        assert res.report["init"]["kind"] == "drn"
