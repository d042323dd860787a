"""Tests of the varied simulator's anatomies (combireg.synth_varied) on the small head phantom."""
from __future__ import annotations

import numpy as np
import pytest

from combireg.errors import CombiregError
from combireg.synth_varied import DIFFICULTIES, generate_varied_set, make_anatomy

from test_synth import _phantom


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


def _anatomy(phantom, seed: int, **options):
    template, brain, afids = phantom
    return make_anatomy(template, afids, seed, brain_mask=brain, landmarks=False, **options)


def _jacobian_determinants(mapping, points: np.ndarray, step_mm: float = 0.25) -> np.ndarray:
    """det of d mapping / dp by central differences in world mm."""
    columns = []
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = step_mm
        columns.append((mapping(points + offset) - mapping(points - offset)) / (2.0 * step_mm))
    return np.linalg.det(np.stack(columns, axis=-1))


def test_standard_difficulty_is_what_a_seed_always_drew(phantom):
    plain = _anatomy(phantom, 5)
    standard = _anatomy(phantom, 5, difficulty="standard")
    assert plain.info == standard.info
    assert plain.info["difficulty"] == "standard"
    lo, hi = DIFFICULTIES["standard"]["cortex_mm"]
    assert plain.info["cortical_field_max_mm"] <= hi


def test_hard_difficulty_deforms_the_cortex_more_and_stays_invertible(phantom):
    standard, hard = _anatomy(phantom, 5), _anatomy(phantom, 5, difficulty="hard")
    assert hard.info["difficulty"] == "hard"
    # The lesion and the shift's size come from the same draws; only the strengths differ.
    assert hard.info["mass_effect_peak_mm"] == standard.info["mass_effect_peak_mm"]
    assert hard.info["brain_shift_mm"] == standard.info["brain_shift_mm"]
    assert hard.info["brain_shift_sigma_mm"] > standard.info["brain_shift_sigma_mm"]
    assert hard.info["cortical_field_max_mm"] > 2.5 * standard.info["cortical_field_max_mm"]
    assert hard.info["cortical_field_max_mm"] > 5.0
    # Ground truth must stay a diffeomorphism: positive Jacobian everywhere in the head, and the
    # numerical inverse used for the landmarks returns every point.
    template = phantom[0]
    rng = np.random.default_rng(0)
    grid = template.geometry.world_grid().reshape(-1, 3)
    points = grid[rng.choice(len(grid), 3000, replace=False)]
    moved_post = hard.psi_post(points)
    det = _jacobian_determinants(hard.psi_post, points)
    assert det.min() > 0.05
    back, residual = hard.psi_post.inverse(moved_post)
    assert np.abs(back - points).max() < 0.05 and residual.max() < 0.05


def test_unknown_difficulty_is_refused(phantom):
    with pytest.raises(CombiregError, match="difficulty 'extreme' is not one of standard, hard"):
        _anatomy(phantom, 5, difficulty="extreme")


def test_unknown_difficulty_is_refused_before_anything_is_read_or_written(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(CombiregError, match="difficulty 'extreme' is not one of standard, hard"):
        generate_varied_set(out, [300], difficulty="extreme", cache_dir=tmp_path / "no-template-here")
    assert not out.exists() and not (tmp_path / "no-template-here").exists()
