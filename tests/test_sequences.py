"""Tests of the sequence-change check (combireg.sequences)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from combireg.params import default_settings, load_settings
from combireg.sequences import (CROSS_SEQUENCE_SIMILARITY, SEQUENCE_CHANGE_THRESHOLD, TISSUE_ORDER_THRESHOLD,
                                channel_sequence_scores, channel_tissue_orders, sequence_change_score,
                                settings_for_sequences, tissue_order)

from test_synth import _phantom

PRESETS = Path(__file__).resolve().parents[1] / "params"


def _normalised(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min())


@pytest.fixture(scope="module")
def head():
    """The phantom's T1 and T2 (normalised) and its grid's spacing (3.2 x 3.6 x 4 mm, oblique)."""
    image, _, _ = _phantom()
    t1, t2 = (_normalised(image.data[c]) for c in range(2))
    return t1, t2, image.geometry.spacing


def test_one_sequence_scores_near_zero_even_with_noise_gamma_and_a_shift(head):
    t1, _, spacing = head
    generator = torch.Generator().manual_seed(0)
    other = t1.roll(1, dims=0) ** 0.8 * 0.9 + 0.02 * torch.randn(t1.shape, generator=generator)
    assert sequence_change_score(t1, t1, spacing) == pytest.approx(0.0, abs=1e-6)
    assert sequence_change_score(t1, other.clamp(0, 1), spacing) < 0.15


def test_t1_against_t2_and_inverted_contrast_score_above_the_threshold(head):
    t1, t2, spacing = head
    # T2 against T1: CSF bright where T1 is dark, white matter the other way round (not monotonic).
    assert sequence_change_score(t1, t2, spacing) > SEQUENCE_CHANGE_THRESHOLD + 0.1
    # A linear but inverted relation: anti-correlated nearly everywhere.
    assert sequence_change_score(t1, 1.0 - t1, spacing) > 0.8


def test_a_fine_grid_is_scored_on_about_2_mm_blocks():
    # The same smooth pair on a 1 mm grid and block-averaged to 2 mm scores the same.
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, 64),) * 3, indexing="ij")
    head = ((x ** 2 + y ** 2 + z ** 2) < 0.8).float()
    t1 = head * (0.5 + 0.3 * torch.sin(5 * x) * torch.cos(4 * y) + 0.1 * z)
    t2 = head * (0.6 - 0.3 * torch.sin(5 * x) * torch.cos(4 * y)) ** 2
    fine = sequence_change_score(t1, t2, (1.0, 1.0, 1.0))
    coarse = sequence_change_score(F.avg_pool3d(t1[None, None], 2)[0, 0], F.avg_pool3d(t2[None, None], 2)[0, 0],
                                   (2.0, 2.0, 2.0))
    assert fine == pytest.approx(coarse, abs=1e-5)
    assert fine > SEQUENCE_CHANGE_THRESHOLD


def test_a_thin_slab_of_fine_voxels_is_scored():
    # 0.5 mm voxels would be averaged in blocks of 4, but the slab is 3 voxels thick.
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48),
                             indexing="ij")
    t1 = 0.5 + 0.4 * torch.sin(4 * x) * torch.cos(3 * y)
    assert sequence_change_score(t1, t1, (0.5, 0.5, 0.5)) == pytest.approx(0.0, abs=1e-6)
    assert sequence_change_score(t1, 1.0 - t1, (0.5, 0.5, 0.5)) > 0.8


def test_score_refuses_images_on_different_grids():
    with pytest.raises(ValueError, match="one 3-D grid"):
        sequence_change_score(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), (1.0, 1.0, 1.0))


def test_a_flat_pair_scores_zero():
    assert sequence_change_score(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), (1.0, 1.0, 1.0)) == 0.0


def _flair_like(t2: torch.Tensor) -> torch.Tensor:
    """The phantom's T2 with its brightest (fluid-like) values suppressed, as FLAIR does."""
    fluid = ((t2 - 0.35) / 0.35).clamp(0, 1)
    return _normalised(t2 * (1.0 - 0.9 * fluid))


def test_tissue_order_ignores_a_monotone_change_of_contrast_and_reverses_with_an_inversion(head):
    t1, _, spacing = head
    assert tissue_order(t1, t1 ** 0.5, spacing) == pytest.approx(1.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    noisy = (t1.roll(1, dims=0) ** 0.8 * 0.9 + 0.02 * torch.randn(t1.shape, generator=generator)).clamp(0, 1)
    assert tissue_order(t1, noisy, spacing) > TISSUE_ORDER_THRESHOLD + 0.05
    assert tissue_order(t1, 1.0 - t1, spacing) == pytest.approx(-1.0, abs=1e-6)


def test_a_flair_like_contrast_is_caught_by_the_tissue_order_where_the_score_misses_it(head):
    # Fluid dark on both sides, the brightest tissues reversed: the score sees mostly one
    # sequence (a monotone relation over most of the head), the tissue order does not.
    t1, t2, spacing = head
    flair = _flair_like(t2)
    assert sequence_change_score(t1, flair, spacing) < SEQUENCE_CHANGE_THRESHOLD
    assert tissue_order(t1, flair, spacing) < TISSUE_ORDER_THRESHOLD
    settings, note = settings_for_sequences(default_settings(), t1[None, None], flair[None, None], spacing)
    assert note["action"] == "cross-sequence similarity" and note["tissue_order_threshold"] == TISSUE_ORDER_THRESHOLD
    assert note["reason"].startswith("tissue order") and "score" not in note["reason"]
    assert settings.metrics == CROSS_SEQUENCE_SIMILARITY["metrics"]
    assert note["tissue_order"] == pytest.approx(tissue_order(t1, flair, spacing), abs=1e-4)
    assert channel_tissue_orders(t1[None, None], flair[None, None], spacing)[0] == \
        pytest.approx(note["tissue_order"], abs=1e-4)


def test_tissue_order_of_a_flat_pair_says_nothing_and_refuses_different_grids():
    assert tissue_order(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), (1.0, 1.0, 1.0)) == 1.0
    with pytest.raises(ValueError, match="one 3-D grid"):
        tissue_order(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), (1.0, 1.0, 1.0))


def test_the_switch_takes_the_shipped_cross_sequence_similarity(head):
    t1, t2, spacing = head
    settings, note = settings_for_sequences(default_settings(), t1[None, None], t2[None, None], spacing)
    assert note["different"] and note["action"] == "cross-sequence similarity"
    assert note["score"] == pytest.approx(note["channel_scores"][0]) and note["threshold"] == SEQUENCE_CHANGE_THRESHOLD
    shipped = load_settings(PRESETS / "cross_sequence.txt")
    for name in CROSS_SEQUENCE_SIMILARITY:
        assert getattr(settings, name) == getattr(shipped, name), name
    # Everything else stays the default's.
    assert settings.replace(**{n: getattr(default_settings(), n) for n in CROSS_SEQUENCE_SIMILARITY}) == \
        default_settings()


def test_the_mean_over_channel_pairs_decides(head):
    t1, t2, spacing = head
    same = torch.stack([t1, t2])[None]
    swapped = torch.stack([t2, t1])[None]
    scores = channel_sequence_scores(same, swapped, spacing)
    assert len(scores) == 2 and min(scores) > SEQUENCE_CHANGE_THRESHOLD
    settings, note = settings_for_sequences(default_settings(), same, same, spacing)
    assert not note["different"] and note["action"] == "none (one sequence)" and settings == default_settings()


def test_a_file_with_its_own_similarity_or_without_the_check_is_followed(head):
    t1, t2, spacing = head
    own = default_settings().replace(metrics=("NCC",), metric_weights=(1.0,))
    settings, note = settings_for_sequences(own, t1[None, None], t2[None, None], spacing)
    assert settings == own and note["different"] and note["action"].startswith("none (the parameter file")
    longer = default_settings().replace(iterations=(150, 80, 90))
    assert settings_for_sequences(longer, t1[None, None], t2[None, None], spacing)[0] == longer
    off = default_settings().replace(sequence_change_detection=False)
    settings, note = settings_for_sequences(off, t1[None, None], t2[None, None], spacing)
    assert settings == off and "score" not in note and note["action"].startswith("none (SequenceChangeDetection")


def test_the_rank_correlation_equals_scipys_with_ties():
    # Written in numpy (importing scipy.stats would cost every run 0.6 s): same value, ties included.
    from scipy.stats import spearmanr

    from combireg.sequences import _spearman

    rng = np.random.default_rng(0)
    x = np.round(rng.random(500), 2)
    y = np.round(x + rng.normal(0.0, 0.3, 500), 1)
    assert _spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert np.isnan(_spearman(np.ones(5), np.arange(5.0)))
