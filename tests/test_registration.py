"""combireg.optimize + combireg.api: recovery of known fields, the written convention, inverses."""
import json

import numpy as np
import pytest
import torch

from combireg import Image, io
from combireg.api import register
from combireg.errors import CombiregError
from combireg.params import default_settings
from combireg.warp import jacobian_determinant
from tests.conftest import image_from_world_function, itk_warp_with_field, known_displacement, smooth_pattern


def _settings(**changes):
    base = dict(num_levels=2, iterations=(150, 100), learning_rate=(0.02, 0.01), regularization_weight=(0.05, 0.05),
                pyramid_schedule=((2, 2, 2), (1, 1, 1)), ncc_window=(5, 5), bidirectional=True,
                inverse_consistency_weight=0.1,
                # the engine on its own: these phantoms have no pose to correct
                pre_alignment="none")
    base.update(changes)
    return default_settings().replace(**base)


@pytest.fixture(scope="module")
def problem():
    from tests.conftest import oblique_direction
    from combireg import Geometry

    geometry = Geometry((32, 28, 24), origin=(12.0, -7.5, 30.0), spacing=(1.5, 1.2, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    func = lambda p: smooth_pattern(p, centre)  # noqa: E731
    u_true = known_displacement(geometry)
    source = image_from_world_function(geometry, func)
    # target(x) = source(x + u(x)): registering source to target must recover u
    target = image_from_world_function(geometry, func, u_true)
    return source, target, u_true


@pytest.fixture(scope="module")
def result(problem):
    source, target, _ = problem
    return register(source, target, _settings())


def _interior(a, m=3):
    return a[m:-m, m:-m, m:-m]


def test_recovers_known_displacement_within_half_a_voxel(problem, result):
    _, target, u_true = problem
    error = np.linalg.norm(result.displacement_lps_mm - u_true, axis=-1)
    half_voxel = 0.5 * min(target.geometry.spacing)
    initial = np.linalg.norm(u_true, axis=-1)
    assert _interior(initial).mean() > 1.5  # the problem is not trivial
    assert _interior(error).mean() < half_voxel
    assert np.percentile(_interior(error), 90) < half_voxel


def test_forward_and_backward_fields_are_approximately_inverse(result):
    # x -> x + u(x) -> (x + u(x)) + v(x + u(x)) should come back to x (within a fraction of a voxel)
    u, g = result.displacement_lps_mm, result.target_geometry
    from combireg.landmarks import sample_displacement

    points = g.world_grid()[4:-4:3, 4:-4:3, 4:-4:3].reshape(-1, 3)
    mapped = points + sample_displacement(u, g, points)
    back = mapped + sample_displacement(result.inverse_displacement_lps_mm, result.source_geometry, mapped)
    assert np.linalg.norm(back - points, axis=-1).mean() < 0.3
    assert np.linalg.norm(mapped - points, axis=-1).mean() > 1.5


def test_result_report_and_no_folding(result):
    rep = result.report
    assert rep["jacobian"]["percent_nonpositive"] == 0.0
    assert 0.3 < rep["jacobian"]["min"] <= 1.0 <= rep["jacobian"]["max"]
    # away from the borders the Jacobian stays near the true one (0.8 .. 1.2)
    jac = _interior(jacobian_determinant(result.displacement_lps_mm, result.target_geometry), 4)
    assert 0.6 < jac.min() and jac.max() < 1.4
    assert [lvl["iterations"] for lvl in rep["levels"]] == [150, 100]
    # the loss went down on each level
    for lvl in rep["levels"]:
        assert lvl["loss_history"][-1] < lvl["loss_history"][0]
    assert rep["seed"] == 0 and rep["device"] == "cpu"


def test_itk_resampler_with_written_field_reproduces_warped(tmp_path, problem, result):
    """Our field applied by ITK's own DisplacementFieldTransform gives our warped image."""
    source, target, _ = problem
    src_path = tmp_path / "src.nii.gz"
    io.write_image(src_path, source)
    out = result.save(tmp_path / "out")
    ours, theirs = itk_warp_with_field(src_path, out)
    inner = (slice(2, -2),) * 3
    assert np.abs(ours[inner] - theirs[inner]).max() < 1e-3 * np.abs(ours).max()


def test_saved_outputs(tmp_path, result):
    out = result.save(tmp_path / "o")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["field.nii.gz", "field_inverse.nii.gz", "params.txt", "report.json", "warped_0.nii.gz"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["wall_time_s"] > 0 and rep["peak_memory_mb"] > 0
    from combireg.params import load_settings

    assert load_settings(out / "params.txt") == result.settings
    with pytest.raises(CombiregError, match="not empty"):
        result.save(out)
    result.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_source_on_another_grid(problem):
    """A source on a coarser, differently oriented grid is resampled in world coordinates first."""
    from combireg import Geometry

    source, target, u_true = problem
    centre = target.geometry.world_grid().reshape(-1, 3).mean(0)
    other = Geometry((36, 36, 30), origin=tuple(centre - np.array([26.0, 26.0, 29.0])), spacing=(1.5, 1.5, 2.0))
    src_other = image_from_world_function(other, lambda p: smooth_pattern(p, centre))
    res = register(src_other, target, _settings())
    assert res.inverse_displacement_lps_mm.shape == other.shape + (3,)
    assert res.source_geometry == other
    error = np.linalg.norm(res.displacement_lps_mm - u_true, axis=-1)
    assert _interior(error, 5).mean() < 0.5 * min(target.geometry.spacing)


def test_deterministic_for_fixed_seed(problem):
    source, target, _ = problem
    s = _settings(iterations=(20, 10))
    a = register(source, target, s).displacement_lps_mm
    b = register(source, target, s).displacement_lps_mm
    np.testing.assert_array_equal(a, b)


def test_unidirectional_uses_numerical_inverse(problem):
    source, target, u_true = problem
    res = register(source, target, _settings(bidirectional=False))
    error = np.linalg.norm(res.displacement_lps_mm - u_true, axis=-1)
    assert _interior(error).mean() < 0.5 * min(target.geometry.spacing)
    assert np.abs(res.inverse_displacement_lps_mm).max() > 1.0


def test_init_field_is_used(problem, tmp_path):
    source, target, u_true = problem
    # zero iterations: the output is the initial field itself
    s = _settings(iterations=(0, 0))
    res = register(source, target, s, init=(u_true, target.geometry))
    assert np.abs(res.displacement_lps_mm - u_true).max() < 0.05


@pytest.mark.parametrize("mutate, message", [
    (lambda s, t: (Image(s.data.repeat(2, 1, 1, 1), s.geometry), t), "same count"),
    (lambda s, t: (Image(torch.zeros_like(s.data), s.geometry), t), "constant"),
])
def test_bad_inputs(problem, mutate, message):
    source, target, _ = problem
    s, t = mutate(source, target)
    with pytest.raises(CombiregError, match=message):
        register(s, t, _settings(iterations=(1, 1)))


def test_memory_estimate_refuses_too_big(problem):
    source, target, _ = problem
    with pytest.raises(CombiregError, match="GiB but only"):
        register(source, target, _settings(), max_memory_bytes=1000)


# ------------------------------------------------------------------ masks and preprocessing
def _lesion_problem(side: str = "target"):
    """Target = source shifted by a constant t everywhere, plus a bright ball with no counterpart
    on one side; returns the mask (on that side's grid) that excludes the ball, and where the ball
    lies in target space."""
    from combireg import Geometry
    from tests.conftest import oblique_direction

    geometry = Geometry((30, 30, 24), origin=(5.0, -20.0, 12.0), spacing=(1.4, 1.3, 1.8),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    shift = np.array([1.5, -1.0, 1.2])
    source = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre))
    target = image_from_world_function(geometry, lambda p: smooth_pattern(p + shift, centre))
    ball_centre = centre + np.array([4.0, 3.0, -2.0])
    ball = np.linalg.norm(geometry.world_grid() - ball_centre, axis=-1)
    (target if side == "target" else source).data[0][torch.from_numpy(ball < 6.0)] = 2.5
    # a 5 mm margin: the pyramid smooths the ball's edge outwards by a few mm
    mask = Image(torch.from_numpy((ball >= 11.0).astype(np.float32))[None], geometry)
    # target points x whose counterpart (x, or x + t on the source side) lies in the ball
    inside = ball < 6.0 if side == "target" else \
        np.linalg.norm(geometry.world_grid() + shift - ball_centre, axis=-1) < 6.0
    return source, target, mask, shift, inside


@pytest.mark.parametrize("side", ["target", "source"])
def test_mask_keeps_a_lesion_from_pulling_the_field(side):
    source, target, mask, shift, inside = _lesion_problem(side)
    s = _settings(bidirectional=False, inverse_consistency_weight=0.0, regularization_weight=(1.0, 1.0))
    plain = register(source, target, s)
    masked = register(source, target, s, **{f"{side}_mask": mask})
    err_plain = np.linalg.norm(plain.displacement_lps_mm - shift, axis=-1)[inside].mean()
    err_masked = np.linalg.norm(masked.displacement_lps_mm - shift, axis=-1)[inside].mean()
    assert err_masked < 0.35  # mm: inside the lesion the field follows its surroundings
    assert err_masked < 0.5 * err_plain  # and the unmasked run was pulled by the lesion
    assert masked.report["preprocessing"][f"{side}_mask"] is True


def test_bad_masks_are_refused():
    from combireg import Geometry

    source, target, mask, _, _ = _lesion_problem()
    s = _settings(iterations=(1, 1))
    empty = Image(torch.zeros_like(mask.data), mask.geometry)
    with pytest.raises(CombiregError, match="empty"):
        register(source, target, s, target_mask=empty)
    g = mask.geometry
    elsewhere = Image(mask.data.clone(), Geometry(g.size, tuple(np.add(g.origin, 3.0)), g.spacing, g.direction))
    with pytest.raises(CombiregError, match="grid"):
        register(source, target, s, source_mask=elsewhere)


def test_prealignment_is_composed_into_one_field():
    """A rotated and shifted source: with PreAlignment the written field is the whole map."""
    from combireg import Geometry

    geometry = Geometry((36, 36, 30), origin=(-30.0, -28.0, -25.0), spacing=(1.7, 1.6, 2.0))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    angle = np.deg2rad(10.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre - rot @ centre + np.array([3.0, -2.0, 1.5])
    blob = lambda p: smooth_pattern(p, centre) * np.exp(-((p - centre) ** 2).sum(-1) / (2 * 16.0 ** 2))  # noqa: E731
    source = image_from_world_function(geometry, blob)
    # target(x) = source(A x): the true forward field is A x - x
    target = image_from_world_function(geometry, lambda p: blob(p @ rot.T + affine[:3, 3]))
    truth = geometry.world_grid() @ rot.T + affine[:3, 3] - geometry.world_grid()
    s = _settings(pre_alignment="rigid", bidirectional=False, inverse_consistency_weight=0.0,
                  iterations=(40, 20))
    res = register(source, target, s)
    near = np.linalg.norm(geometry.world_grid() - centre, axis=-1) < 18.0
    error = np.linalg.norm(res.displacement_lps_mm - truth, axis=-1)[near]
    assert np.linalg.norm(truth, axis=-1)[near].mean() > 3.0  # not a small problem
    assert error.mean() < 0.6
    np.testing.assert_allclose(res.report["preprocessing"]["affine_target_to_source_lps_mm"], affine, atol=0.6)
    # the inverse undoes the forward map where both are defined
    from combireg.landmarks import sample_displacement

    points = geometry.world_grid()[8:-8:4, 8:-8:4, 8:-8:4].reshape(-1, 3)
    mapped = points + sample_displacement(res.displacement_lps_mm, geometry, points)
    back = mapped + sample_displacement(res.inverse_displacement_lps_mm, res.source_geometry, mapped)
    assert np.linalg.norm(back - points, axis=-1).mean() < 0.3
    # An initial field already says where the source lies: the pre-alignment is skipped, not
    # applied on top of it (the default pre-aligns, and --init FIELD must keep working with it).
    started = register(source, target, s.replace(iterations=(0, 0)), init=(truth, geometry))
    assert started.report["init"]["pre_alignment_skipped"] == "rigid"
    assert "affine_target_to_source_lps_mm" not in started.report["preprocessing"]
    assert np.linalg.norm(started.displacement_lps_mm - truth, axis=-1)[near].mean() < 0.3


def test_working_grid_result_is_on_the_target_grid(problem):
    source, target, u_true = problem
    res = register(source, target, _settings(working_spacing=2.0, working_orientation="RAS"))
    assert res.target_geometry == target.geometry
    assert res.displacement_lps_mm.shape == target.geometry.shape + (3,)
    grid = res.report["preprocessing"]["working_grid"]
    assert grid["spacing"] == pytest.approx([2.0, 2.0, 2.0])
    error = np.linalg.norm(res.displacement_lps_mm - u_true, axis=-1)
    assert _interior(error, 4).mean() < 0.5 * min(target.geometry.spacing)


# ------------------------------------------------------------------ mutual information
def _inverted_contrast_problem():
    """A T1-like head phantom (dark background, grey shell, bright white matter, dark
    ventricles) as the source and, as the target, its inverted-contrast copy shifted by a
    constant t: target(x) = 1 - source(x + t), so the forward field should be t everywhere."""
    from combireg import Geometry
    from tests.conftest import oblique_direction

    geometry = Geometry((30, 30, 24), origin=(5.0, -20.0, 12.0), spacing=(1.4, 1.3, 1.8),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)

    def inside(p, middle, radii, sharpness):
        """A smooth ellipsoid indicator, 1 inside, 0 outside."""
        radius = np.sqrt((((p - centre - middle) / radii) ** 2).sum(-1))
        return 1.0 / (1.0 + np.exp(-(1.0 - radius) * sharpness))

    def t1_like(p):
        image = (0.45 * inside(p, 0.0, [17.0, 15.0, 16.0], 16.0) + 0.35 * inside(p, 0.0, [11.0, 9.0, 10.0], 10.0)
                 - 0.3 * inside(p, [3.5, 1.0, 2.0], [2.0, 5.0, 3.0], 3.0)
                 - 0.3 * inside(p, [-3.5, 1.5, 1.0], [2.5, 4.0, 3.0], 3.0))
        return (image + 0.08 * smooth_pattern(p, centre)).astype(np.float32)  # texture: no symmetry

    shift = np.array([1.5, -1.0, 1.2])
    source = image_from_world_function(geometry, t1_like)
    target = Image(1.0 - image_from_world_function(geometry, lambda p: t1_like(p + shift)).data, geometry)
    near_centre = np.linalg.norm(geometry.world_grid() - centre, axis=-1) < 10.0
    return source, target, shift, near_centre


def test_mi_recovers_a_shift_across_inverted_contrast_where_mse_fails():
    source, target, shift, near_centre = _inverted_contrast_problem()
    half_voxel = 0.5 * min(target.geometry.spacing)

    def centre_error(metric):
        s = _settings(metrics=(metric,), bidirectional=False, inverse_consistency_weight=0.0,
                      iterations=(100, 60), regularization_weight=(3.0,), histogram_bins=(32,))
        res = register(source, target, s)
        return np.linalg.norm(res.displacement_lps_mm - shift, axis=-1)[near_centre]

    assert np.linalg.norm(shift) > 2.0 * half_voxel  # not trivial
    mi = centre_error("MI")
    assert mi.mean() < 0.5 * half_voxel and mi.max() < half_voxel
    # MSE matches intensities, which the inversion changed: it ends further off than no
    # registration (measured: MI 0.16 mm mean error, MSE 2.6 mm, |t| 2.2 mm)
    mse = centre_error("MSE")
    assert mse.mean() > max(3.0 * half_voxel, np.linalg.norm(shift))


def test_ngf_recovers_a_shift_across_inverted_contrast_alone_and_beside_mse_and_ncc():
    # NGF matches edge directions whichever side is brighter; MSE+NCC+NGF (the metrics of
    # params/cross_sequence.txt), whose MSE term alone fails here (above), still lands within
    # half a voxel near the centre.
    source, target, shift, near_centre = _inverted_contrast_problem()
    half_voxel = 0.5 * min(target.geometry.spacing)

    def centre_error(metrics):
        s = _settings(metrics=metrics, metric_weights=(1.0 / len(metrics),) * len(metrics), bidirectional=False,
                      inverse_consistency_weight=0.0, iterations=(100, 60), regularization_weight=(3.0,))
        res = register(source, target, s)
        assert "forward_NGF" in res.report["levels"][-1]["final_terms"]
        return np.linalg.norm(res.displacement_lps_mm - shift, axis=-1)[near_centre]

    # measured: NGF 0.32 mm mean error (max 0.57), all three 0.18 (max 0.35); half a voxel 0.65
    ngf = centre_error(("NGF",))
    assert ngf.mean() < 0.6 * half_voxel and ngf.max() < half_voxel
    three = centre_error(("MSE", "NCC", "NGF"))
    assert three.mean() < 0.5 * half_voxel and three.max() < 0.75 * half_voxel


def test_the_default_takes_the_cross_sequence_similarity_across_inverted_contrast():
    # SequenceChangeDetection: the inverted copy scores as another sequence, so a run with the
    # defaults optimises MSE+NCC+NGF (params/cross_sequence.txt) and says so; the same pair in
    # one contrast keeps the default's MSE+NCC and finds the shift. (What the switch gains is
    # measured on the varied benchmark's T1/T2 pairs: on this small phantom, whose inversion is
    # linear and which the default's 8 mm level barely resolves, it gains nothing.)
    source, target, shift, near_centre = _inverted_contrast_problem()
    half_voxel = 0.5 * min(target.geometry.spacing)
    settings = default_settings().replace(pre_alignment="none")
    res = register(source, target, settings)
    note = res.report["sequences"]
    assert note["different"] and note["score"] > 0.8 and note["action"] == "cross-sequence similarity"
    assert "forward_NGF" in res.report["levels"][-1]["final_terms"]
    assert '(Metric "MSE" "NCC" "NGF")' in res.params_text() and "(MaximumNumberOfIterations 150 80 180)" in \
        res.params_text()
    same_contrast = Image(1.0 - target.data, target.geometry)
    res = register(source, same_contrast, settings)
    assert res.report["sequences"]["action"] == "none (one sequence)" and res.report["sequences"]["score"] < 0.2
    assert "forward_NGF" not in res.report["levels"][-1]["final_terms"]
    error = np.linalg.norm(res.displacement_lps_mm - shift, axis=-1)[near_centre]
    assert error.mean() < half_voxel


def test_ngf_runs_on_an_image_too_thin_for_it_on_the_coarsest_level():
    # 6 voxels of 2 mm along x: 2 on the 8 mm level, where NGF has no central difference.
    from combireg import Geometry

    geometry = Geometry((6, 20, 20), origin=(0.0, 0.0, 0.0), spacing=(2.0, 2.0, 2.0))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    source = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre))
    target = image_from_world_function(geometry, lambda p: smooth_pattern(p + np.array([0.0, 0.0, 1.0]), centre))
    settings = default_settings().replace(pre_alignment="none", iterations=(5, 5, 5), metrics=("MSE", "NCC", "NGF"),
                                          metric_weights=(0.5, 0.25, 0.25))
    res = register(source, target, settings)
    levels = res.report["levels"]
    assert levels[0]["shape_zyx"][2] == 2 and levels[0]["final_terms"]["forward_NGF"] == 1.0
    assert levels[-1]["final_terms"]["forward_NGF"] < 1.0


def test_histogram_bins_reach_the_mi_term_per_level():
    source, target, _, _ = _inverted_contrast_problem()

    def final_mi(bins):
        s = _settings(metrics=("MI",), bidirectional=False, inverse_consistency_weight=0.0, iterations=(1, 1),
                      histogram_bins=bins)
        return [level["final_terms"]["forward_MI"] for level in register(source, target, s).report["levels"]]

    coarse, fine = final_mi((8,)), final_mi((32,))
    mixed = final_mi((8, 32))
    # -MI >= -log(bins): 8 bins cannot reach what 32 bins measure on these sharp-edged images
    assert all(-np.log(8) <= v for v in coarse) and fine[0] < coarse[0] - 0.3
    assert mixed[0] == coarse[0] and mixed[1] < coarse[1] - 0.3


def test_default_settings_recover_a_large_pose_that_the_deformable_step_alone_does_not():
    """15 degrees about an oblique axis and 15 mm: the default's centre-of-gravity start and rigid
    pre-alignment (no key given) bring it within a voxel; the same run without them does not."""
    from combireg import Geometry
    from tests.conftest import oblique_direction

    target_geometry = Geometry((40, 40, 32), origin=(-32.0, -31.0, -30.0), spacing=(1.6, 1.6, 2.0))
    source_geometry = Geometry((44, 42, 36), origin=(-40.0, -36.0, -36.0), spacing=(1.8, 1.7, 2.0),
                               direction=tuple(oblique_direction(7.0).ravel()))
    centre = target_geometry.world_grid().reshape(-1, 3).mean(0)
    axis = np.array([0.4, -0.3, 1.0]) / np.linalg.norm([0.4, -0.3, 1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(15.0)
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    shift = centre - rot @ centre + np.array([9.0, -9.0, 8.0])  # |(9, -9, 8)| = 15 mm
    blob = lambda p: smooth_pattern(p, centre) * np.exp(-((p - centre) ** 2).sum(-1) / (2 * 16.0 ** 2))  # noqa: E731
    source = image_from_world_function(source_geometry, blob)
    target = image_from_world_function(target_geometry, lambda p: blob(p @ rot.T + shift))
    x = target_geometry.world_grid()
    truth = x @ rot.T + shift - x
    near = np.linalg.norm(x - centre, axis=-1) < 18.0
    assert np.linalg.norm(truth, axis=-1)[near].mean() > 14.0  # a large pose difference

    quick = default_settings().replace(iterations=(40, 20, 10))  # the defaults otherwise (mm pyramid, rigid)
    assert quick.pre_alignment == "rigid"
    error = np.linalg.norm(register(source, target, quick).displacement_lps_mm - truth, axis=-1)[near]
    assert error.mean() < 1.0, error.mean()
    without = register(source, target, quick.replace(pre_alignment="none"))
    worse = np.linalg.norm(without.displacement_lps_mm - truth, axis=-1)[near].mean()
    assert worse > 2.0 and worse > 3.0 * error.mean(), (worse, error.mean())
