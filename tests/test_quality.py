"""The do-no-harm self-check: similarity before/after and folding, with warnings."""
from __future__ import annotations

import numpy as np
import torch

from combireg import register
from combireg.geometry import Geometry
from combireg.params import default_settings
from combireg.quality import MAX_FOLDING_PERCENT, self_check, structural_similarity
from tests.conftest import image_from_world_function, known_displacement, oblique_direction, smooth_pattern


def _pair():
    geometry = Geometry((30, 28, 24), origin=(10.0, -5.0, 20.0), spacing=(1.5, 1.2, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    func = lambda p: smooth_pattern(p, centre)  # noqa: E731
    source = image_from_world_function(geometry, func)
    target = image_from_world_function(geometry, func, known_displacement(geometry))
    return source, target


def _normalised(image):
    data = image.data[None].float()
    return (data - data.min()) / (data.max() - data.min())


def test_structural_similarity_is_contrast_invariant_and_drops_with_misalignment():
    source, target = _pair()
    s, t = _normalised(source), _normalised(target)
    same = structural_similarity(t, t)
    assert same > 0.99
    assert abs(structural_similarity(1.0 - t, t) - same) < 1e-3  # inverted contrast reads the same
    assert structural_similarity(s, t) < same - 0.01


def test_self_check_warns_when_the_result_is_worse_than_the_start():
    source, target = _pair()
    s, t = _normalised(source), _normalised(target)
    generator = torch.Generator().manual_seed(0)
    scrambled = 0.2 * torch.randn((1, 3) + tuple(t.shape[2:]), generator=generator)
    bad = self_check(s, t, scrambled, folding_percent=5.0)
    assert bad["similarity"]["final"] < bad["similarity"]["start"]
    assert len(bad["warnings"]) == 2
    assert "worse than the identity" in bad["warnings"][0] and "folds 5.00 %" in bad["warnings"][1]
    fine = self_check(s, t, torch.zeros_like(scrambled), folding_percent=0.0)
    assert fine["warnings"] == [] and fine["similarity"]["final"] == fine["similarity"]["start"]
    assert MAX_FOLDING_PERCENT < 5.0


def test_register_reports_the_check_and_a_sane_run_passes_it():
    source, target = _pair()
    s = default_settings().replace(num_levels=2, pyramid_spacing=(4.0, 2.0), iterations=(60, 30),
                                   ncc_window_mm=(12.0, 8.0), learning_rate=(0.02, 0.01),
                                   regularization_weight=(0.3, 0.1), pre_alignment="none")
    result = register(source, target, s)
    quality = result.report["quality"]
    assert quality["warnings"] == []
    assert quality["similarity"]["final"] > quality["similarity"]["start"]
    assert quality["similarity"]["start_is"] == "identity"


def test_register_warns_about_a_run_that_made_things_worse(caplog):
    source, target = _pair()
    # Far too large steps from the first iteration, without regularisation: the field scrambles
    # the image.
    s = default_settings().replace(num_levels=1, pyramid_spacing=(1.0,), iterations=(40,), learning_rate=(0.5,),
                                   regularization_weight=(0.0,), metrics=("MSE",),
                                   pre_alignment="none", warm_up_iterations=0)
    with caplog.at_level("WARNING"):
        result = register(source, target, s)
    warnings = result.report["quality"]["warnings"]
    assert any("worse than the identity" in w for w in warnings)
    assert any("worse than the identity" in r.getMessage() for r in caplog.records)
    assert np.isfinite(result.report["quality"]["similarity"]["final"])


def test_a_harmful_initial_field_is_reported_against_the_plain_start(caplog):
    """An initialisation (a DRN's, a field) that leaves the result worse than no initialisation
    at all gets a warning, even when the optimisation improved on the initialisation itself."""
    source, target = _pair()
    geometry = target.geometry
    # a smooth, large, wrong field: 6 mm along the first world axis, varying across the image
    x = geometry.world_grid()
    wrong = np.zeros(x.shape, np.float32)
    wrong[..., 0] = 6.0 * np.sin(2 * np.pi * (x[..., 1] - x[..., 1].min()) / 40.0)
    s = default_settings().replace(num_levels=1, pyramid_spacing=(2.0,), iterations=(0,), pre_alignment="none")
    with caplog.at_level("WARNING"):
        result = register(source, target, s, init=(wrong, geometry))
    quality = result.report["quality"]
    assert quality["similarity"]["start_is"] == "initial field"
    assert quality["similarity"]["without_initial_field"] > quality["similarity"]["final"]
    assert any("worse than the identity (without the initial field)" in w for w in quality["warnings"])
    # a good initial field (here: none needed, the zero field) raises nothing
    calm = register(source, target, s, init=(np.zeros_like(wrong), geometry))
    assert calm.report["quality"]["warnings"] == []
