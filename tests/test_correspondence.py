"""Automatic missing-correspondence weights (CorrespondenceWeighting) and adaptive metric weights
(MetricWeighting "adaptive"): combireg.optimize, combireg.api and the parameter keys."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from combireg import Geometry, Image, io
from combireg.api import register
from combireg.outputs import CORRESPONDENCE_WEIGHT_NAME
from combireg.errors import CombiregError
from combireg.losses import SIMILARITIES
from combireg.optimize import balanced_metric_weights, correspondence_weight, optimise_fields
from combireg.paramfile import parse_text
from combireg.params import default_settings, settings_from_map
from combireg.warp import identity_grid, resample_image, warp_image, warp_normalised
from tests.conftest import ROOT, image_from_world_function, oblique_direction, smooth_pattern

CASE = ROOT / "data_samples" / "case0000"
CAVITY_RADIUS_MM = 7.0


def _settings(**changes):
    base = dict(num_levels=2, pyramid_schedule=((2, 2, 2), (1, 1, 1)), iterations=(100, 60),
                learning_rate=(0.02, 0.01), regularization_weight=(0.3, 0.1), ncc_window=(5, 5),
                # the diffusion term alone, as these thresholds were measured with: the default's
                # bending term keeps the two fields closer to inverse inside the cavity (weight
                # 0.30 there instead of 0.001), so the mechanism is tested on its own
                bending_weight=(0.0,),
                bidirectional=True, inverse_consistency_weight=0.0, correspondence_weighting=True,
                # the engine on its own: these phantoms have no pose to correct
                pre_alignment="none")
    base.update(changes)
    return default_settings().replace(**base)


@pytest.fixture(scope="module")
def sample():
    """A piece of the sample case's pre-op T1+T2 (healthy hemisphere) on an oblique, anisotropic
    30x28x26 grid as the source; the target is the source under a known smooth field that
    vanishes at the grid's border (so every target voxel has its source voxel), and a copy of it
    with a simulated resection cavity: a CSF-filled ball whose tissue has no counterpart in the
    source.

    Why not the simulator's own cavity: combireg.synth maps the pre-op tumour one-to-one onto the
    post-op cavity (a ball onto a smaller ball), which both fields can follow consistently, so the
    forward-backward error there is no larger than elsewhere (measured on data_samples/case0000:
    median 0.6 mm inside the cavity against 0.8 mm in the rest of the brain).
    """
    pre = io.read_channels([CASE / "source_t1.nii.gz", CASE / "source_t2.nii.gz"], role="source")
    info = json.loads((CASE / "case.json").read_text())
    centre = np.array(info["tumour"]["centre_source_lps_mm"]) * [-1.0, 1.0, 1.0]  # the other hemisphere
    direction = oblique_direction()
    size, spacing = np.array([30, 28, 26]), np.array([1.9, 2.1, 2.3])
    origin = centre - direction @ (spacing * (size - 1) / 2.0)
    geometry = Geometry(tuple(int(s) for s in size), tuple(origin), tuple(spacing), tuple(direction.ravel()))
    source = resample_image(pre, geometry)
    points = geometry.world_grid()
    r = points - centre
    k, j, i = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in geometry.shape], indexing="ij")
    taper = (np.sin(np.pi * i) * np.sin(np.pi * j) * np.sin(np.pi * k)) ** 0.5
    u_true = np.stack([2.5 * np.sin(r[..., 1] / 15.0), np.full(r.shape[:3], 2.0), 1.5 * np.cos(r[..., 0] / 12.0)],
                      axis=-1) * taper[..., None]
    target = warp_image(source, geometry, u_true.astype(np.float32))
    cavity_centre = centre + np.array([3.0, -4.0, 2.0])
    distance = np.linalg.norm(points - cavity_centre, axis=-1)
    ball = torch.from_numpy(0.5 * (1.0 - np.tanh((distance - CAVITY_RADIUS_MM) / 1.0))).float()
    csf = [float(np.percentile(source.data[0].numpy(), 2)), float(np.percentile(source.data[1].numpy(), 99))]
    with_cavity = Image(torch.stack([target.data[c] * (1 - ball) + csf[c] * ball for c in range(2)]), geometry)
    return {"source": source, "target": target, "target_cavity": with_cavity, "u": u_true,
            "inside": distance < 0.7 * CAVITY_RADIUS_MM, "far": distance > 2.0 * CAVITY_RADIUS_MM}


@pytest.fixture(scope="module")
def with_cavity(sample):
    return register(sample["source"], sample["target_cavity"], _settings())


def test_weight_drops_inside_a_simulated_cavity(sample, with_cavity):
    weight = with_cavity.correspondence_weight.numpy()[0]
    inside, far = weight[sample["inside"]].mean(), weight[sample["far"]].mean()
    assert inside < 0.1  # measured 0.001
    assert far > 0.97  # measured 0.999
    # excluding the cavity keeps it from dragging the field: better than the same run without
    plain = register(sample["source"], sample["target_cavity"], _settings(correspondence_weighting=False))
    assert plain.correspondence_weight is None and "correspondence" not in plain.report

    def error(res):
        return np.linalg.norm(res.displacement_lps_mm - sample["u"], axis=-1)[sample["inside"]].mean()

    assert error(with_cavity) < 0.5 * error(plain)  # measured 2.9 vs 9.2 mm


def test_weight_stays_one_with_perfect_correspondence(sample):
    res = register(sample["source"], sample["target"], _settings())
    weight = res.correspondence_weight.numpy()[0]
    assert weight.mean() > 0.95  # measured 0.999
    assert res.report["correspondence"]["fraction_below_0.5"] < 0.01
    error = np.linalg.norm(res.displacement_lps_mm - sample["u"], axis=-1)
    assert error.mean() < 0.5 * min(sample["target"].geometry.spacing)  # still a good registration


def test_cap_bounds_the_excluded_share(sample, tmp_path):
    cap = 0.02
    # a last level at half resolution: the weight is up-sampled and resampled onto the target grid
    res = register(sample["source"], sample["target_cavity"],
                   _settings(correspondence_max_exclusion=cap, pyramid_schedule=((4, 4, 4), (2, 2, 2))))
    for level in res.report["levels"]:
        assert level["correspondence"]["excluded"] <= cap + 1e-4
        assert level["correspondence"]["capped"] is True
    weight = res.correspondence_weight.numpy()[0]
    assert 1.0 - weight.mean() <= cap + 0.01
    assert weight[sample["inside"]].mean() < 0.8 * weight[sample["far"]].mean()  # still the cavity
    # the written file: on the target grid, values in [0, 1], summarised in report.json
    out = res.save(tmp_path / "out")
    written = io.read_image(out / CORRESPONDENCE_WEIGHT_NAME)
    target = sample["target"].geometry
    assert written.geometry.shape == target.shape
    np.testing.assert_allclose(written.geometry.origin, target.origin, atol=1e-4)
    np.testing.assert_allclose(written.geometry.spacing, target.spacing, atol=1e-5)
    np.testing.assert_allclose(written.geometry.direction, target.direction, atol=1e-6)
    values = written.numpy()[0]
    assert values.min() >= 0.0 and values.max() <= 1.0
    np.testing.assert_allclose(values, weight, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["correspondence"]["file"] == CORRESPONDENCE_WEIGHT_NAME
    assert 0.0 <= report["correspondence"]["fraction_below_0.5"] <= 0.05


def test_weight_from_another_working_grid_is_on_the_target_grid(sample):
    res = register(sample["source"], sample["target_cavity"],
                   _settings(working_spacing=3.0, working_orientation="RAS", iterations=(30, 20)))
    weight = res.correspondence_weight
    assert weight.geometry == sample["target"].geometry
    values = weight.numpy()[0]
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert values[sample["inside"]].mean() < 0.5 * values[sample["far"]].mean()


def test_correspondence_weight_function():
    geometry = Geometry((12, 10, 8), spacing=(2.0, 1.5, 3.0), direction=tuple(oblique_direction().ravel()))
    grid = identity_grid(geometry.shape)
    forward = torch.zeros((1, 3) + geometry.shape)
    forward[:, 0] = 0.1  # 0.1 normalised = 0.1 * 11 mm along the grid's x axis
    exact_inverse = -forward
    weight, info = correspondence_weight(forward, exact_inverse, geometry, error_scale_mm=2.0, smoothing_mm=2.0,
                                         max_exclusion=0.5, grid=grid)
    assert torch.allclose(weight, torch.ones_like(weight)) and info["excluded"] < 1e-6
    # backward field zero: the error is |u| = 1.1 mm everywhere, w = exp(-(1.1 / 2)^4)
    weight, info = correspondence_weight(forward, torch.zeros_like(forward), geometry, error_scale_mm=2.0,
                                         smoothing_mm=0.0, max_exclusion=0.5)
    assert torch.allclose(weight, torch.full_like(weight, np.exp(-(1.1 / 2.0) ** 4)), atol=1e-5)
    assert not info["capped"]
    # a cap below that: the scale is raised until exactly the cap is excluded, never zero weight
    weight, info = correspondence_weight(forward, torch.zeros_like(forward), geometry, error_scale_mm=1.0,
                                         smoothing_mm=0.0, max_exclusion=0.1)
    assert info["capped"] and abs(info["excluded"] - 0.1) < 1e-4 and info["error_scale_mm"] > 1.0
    assert float(weight.min()) > 0.0
    # without content (empty background) no evidence: weight 1 there, the share counted where content is
    content = torch.zeros((1, 1) + geometry.shape)
    content[..., :4] = 1.0
    weight, info = correspondence_weight(forward, torch.zeros_like(forward), geometry, error_scale_mm=2.0,
                                         smoothing_mm=0.0, max_exclusion=0.5, content=content)
    assert torch.all(weight[..., 4:] == 1.0)
    np.testing.assert_allclose(weight[..., :4].numpy(), np.exp(-(1.1 / 2.0) ** 4), atol=1e-5)
    assert info["excluded"] == pytest.approx(1.0 - np.exp(-(1.1 / 2.0) ** 4), abs=1e-5)


def test_run_cli_writes_the_weight(sample, tmp_path):
    from combireg.cli.main import main

    for name, image in (("s", sample["source"]), ("t", sample["target_cavity"])):
        for c in range(2):
            io.write_image(tmp_path / f"{name}{c}.nii.gz", image.channel(c))
    params = tmp_path / "p.txt"
    params.write_text('(NumberOfResolutions 2)\n(ImagePyramidSchedule 4 4 4 2 2 2)\n(MaximumNumberOfIterations 30 10)\n'
                      '(Bidirectional "true")\n(CorrespondenceWeighting "true")\n(CorrespondenceUpdateInterval 5)\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", f"{tmp_path}/s0.nii.gz,{tmp_path}/s1.nii.gz",
                                    f"{tmp_path}/t0.nii.gz,{tmp_path}/t1.nii.gz", "-o", str(out), "-p", str(params),
                                    "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) == 2  # the usual two lines, nothing more
    assert (out / CORRESPONDENCE_WEIGHT_NAME).exists()
    written = io.read_image(out / CORRESPONDENCE_WEIGHT_NAME)
    assert written.geometry.same_grid(sample["target"].geometry)


# ------------------------------------------------------------------------- adaptive metric weights
def test_balanced_weights_favour_the_smaller_gradient():
    weights = balanced_metric_weights([1.0, 10.0], [0.5, 0.5])
    assert weights == pytest.approx((10 / 11, 1 / 11))
    assert sum(weights) == pytest.approx(1.0) and min(weights) > 0
    # the configured weights act as priors: each metric's weighted gradient is proportional to them
    weights = balanced_metric_weights([2.0, 10.0, 1.0], [0.5, 0.25, 0.25])
    shares = np.array(weights) * [2.0, 10.0, 1.0]
    assert shares / shares.sum() == pytest.approx([0.5, 0.25, 0.25])
    # running average with the previous weights, renormalised
    weights = balanced_metric_weights([1.0, 10.0], [0.5, 0.5], previous=[0.5, 0.5], momentum=0.5)
    assert weights == pytest.approx((0.5 * 0.5 + 0.5 * 10 / 11, 0.5 * 0.5 + 0.5 * 1 / 11))
    # a zero prior stays zero; vanishing gradients everywhere keep the previous weights
    assert balanced_metric_weights([1.0, 3.0], [1.0, 0.0])[1] == 0.0
    assert balanced_metric_weights([0.0, 0.0], [0.5, 0.5], previous=[0.7, 0.3]) == pytest.approx((0.7, 0.3))


def _shift_problem():
    geometry = Geometry((30, 28, 24), origin=(5.0, -20.0, 12.0), spacing=(1.4, 1.3, 1.8),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    shift = np.array([1.5, -1.0, 1.2])
    source = image_from_world_function(geometry, lambda p: smooth_pattern(p, centre))
    target = image_from_world_function(geometry, lambda p: smooth_pattern(p + shift, centre))
    return source, target, shift


def test_adaptive_weights_follow_the_gradient_norms():
    """One iteration on one level: the weights are 1 / |dSim_n/du| of the starting field, normalised."""
    source, target, _ = _shift_problem()
    s = default_settings().replace(metrics=("MSE", "GlobalNCC"), metric_weighting="adaptive", num_levels=1,
                                   pyramid_schedule=((1, 1, 1),), iterations=(1,), bidirectional=False,
                                   metric_weighting_interval=1)
    src, tgt = source.data[None], (target.data[None] - target.data.min()) * 3.0  # 3x the contrast: larger MSE gradient
    fields = optimise_fields(src, tgt, source.geometry, s)
    norms = []
    for name in s.metrics:
        u = torch.zeros((1, 3) + source.geometry.shape, requires_grad=True)
        value = SIMILARITIES[name](warp_normalised(src, u), tgt, None, window=5, target_stats=None)
        (grad,) = torch.autograd.grad(value, u)
        norms.append(float(grad.norm()))
    expected = np.array([1.0 / n for n in norms])
    got = fields.levels[0].metric_weights
    assert [got[name] for name in s.metrics] == pytest.approx(list(expected / expected.sum()), rel=1e-4)
    larger = int(np.argmax(norms))
    assert got[s.metrics[larger]] < got[s.metrics[1 - larger]]  # the larger gradient gets the smaller weight


def test_adaptive_registration_recovers_a_shift():
    source, target, shift = _shift_problem()
    s = _settings(correspondence_weighting=False, bidirectional=False, metric_weighting="adaptive",
                  metrics=("MSE", "NCC"), iterations=(80, 40))
    res = register(source, target, s)
    error = np.linalg.norm(res.displacement_lps_mm - shift, axis=-1)[3:-3, 3:-3, 3:-3]
    assert error.mean() < 0.5 * min(source.geometry.spacing)
    for level in res.report["levels"]:
        weights = level["metric_weights"]
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5) and min(weights.values()) > 0
    assert res.report["metric_weights"]["mode"] == "adaptive"
    assert res.report["metric_weights"]["final"] == res.report["levels"][-1]["metric_weights"]
    fixed = register(source, target, s.replace(metric_weighting="fixed", iterations=(1, 1)))
    assert all(level["metric_weights"] == {"MSE": 0.5, "NCC": 0.5} for level in fixed.report["levels"])
    assert "metric_weights" not in fixed.report


# ------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("text, message", [
    ('(CorrespondenceWeighting "true")', 'p.txt:1: CorrespondenceWeighting "true" compares the forward and backward '
                                         'fields, so it needs (Bidirectional "true")'),
    ('(Metric "NCC")\n(MetricWeighting "adaptive")', 'p.txt:2: MetricWeighting "adaptive" balances 2 or more '
                                                     'metrics; Metric lists 1 (line 1)'),
    ('(MetricWeighting "auto")', "p.txt:1: MetricWeighting expects one of 'fixed', 'adaptive', got 'auto'"),
    ("(CorrespondenceMaximumExclusion 0.7)", "p.txt:1: CorrespondenceMaximumExclusion expects a number > 0 and "
                                             "<= 0.5, got '0.7'"),
    ("(CorrespondenceMaximumExclusion 0)", "p.txt:1: CorrespondenceMaximumExclusion expects a number > 0"),
    ("(CorrespondenceErrorScale 0)", "p.txt:1: CorrespondenceErrorScale expects a number > 0, got '0'"),
    ("(CorrespondenceSmoothing -1)", "p.txt:1: CorrespondenceSmoothing expects a number >= 0, got '-1'"),
    ("(CorrespondenceUpdateInterval 0)", "p.txt:1: CorrespondenceUpdateInterval expects an integer >= 1, got '0'"),
    ("(MetricWeightingInterval 2.5)", "p.txt:1: MetricWeightingInterval expects an integer >= 1, got '2.5'"),
    ('(CorrespondenceWeighting "yes")', "p.txt:1: CorrespondenceWeighting expects \"true\" or \"false\", got 'yes'"),
])
def test_configuration_errors_are_one_line(text, message):
    with pytest.raises(CombiregError) as info:
        settings_from_map(parse_text(text, "p.txt"))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_consistent_configuration_and_round_trip():
    s = settings_from_map(parse_text('(Bidirectional "true")\n(CorrespondenceWeighting "true")\n'
                                     '(CorrespondenceErrorScale 1.5)\n(MetricWeighting "adaptive")\n'
                                     '(MetricWeightingInterval 5)\n(CorrespondenceMaximumExclusion 0.2)'))
    assert s.correspondence_weighting and s.correspondence_error_scale == 1.5 and s.metric_weighting == "adaptive"
    assert s.metric_weighting_interval == 5 and s.correspondence_max_exclusion == 0.2
    assert settings_from_map(s.to_parameter_map()) == s
    defaults = default_settings()
    assert not defaults.correspondence_weighting and defaults.metric_weighting == "fixed"
    with pytest.raises(CombiregError, match="Bidirectional"):
        defaults.replace(correspondence_weighting=True)
    # settings built around the validation are refused by the optimiser too
    import dataclasses

    unchecked = dataclasses.replace(defaults, correspondence_weighting=True)
    one = torch.rand((1, 1, 8, 8, 8))
    with pytest.raises(CombiregError, match="Bidirectional"):
        optimise_fields(one, one, Geometry((8, 8, 8)), unchecked)
