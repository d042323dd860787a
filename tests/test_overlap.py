"""combireg.overlap: Dice and HD95 (mm) on an oblique, anisotropic grid, against brute force."""
import math

import numpy as np
import pytest

from combireg.overlap import dice, hd95_mm, label_overlap, labels_in_both, overlap_summary, surface


def _brute_surface_distances(a, b, geometry):
    """Nearest-surface-voxel distances in world mm by brute force over voxel-centre pairs."""
    def world(mask):
        zyx = np.argwhere(surface(mask))
        return geometry.index_to_world(zyx[:, ::-1].astype(np.float64))

    wa, wb = world(a), world(b)
    d = np.linalg.norm(wa[:, None] - wb[None], axis=2)
    return d.min(axis=1), d.min(axis=0)


def _ball(geometry, centre_index, radius_mm):
    world = geometry.world_grid()
    centre = geometry.index_to_world(np.asarray([centre_index], dtype=float))[0]
    return np.linalg.norm(world - centre, axis=-1) <= radius_mm


def test_hd95_is_the_world_distance_on_an_oblique_grid(oblique_geometry):
    a = _ball(oblique_geometry, (12, 11, 9), 7.0)
    b = _ball(oblique_geometry, (15, 12, 10), 5.5)
    a_to_b, b_to_a = _brute_surface_distances(a, b, oblique_geometry)
    expected = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    assert hd95_mm(a, b, oblique_geometry) == pytest.approx(expected, rel=1e-9)
    assert expected > 3.0  # spacing 1.5/1.2/2.0 mm matters: a voxel count would be off
    assert hd95_mm(a, a, oblique_geometry) == 0.0
    assert math.isnan(hd95_mm(a, np.zeros_like(a), oblique_geometry))


def test_dice_numbers():
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros_like(a)
    a[:2] = True  # 60 voxels
    b[1:3] = True  # 60 voxels, 30 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_label_overlap_scores_the_labels_present_in_both(oblique_geometry):
    target = np.zeros(oblique_geometry.shape, np.int16)
    target[2:10, 3:12, 4:14] = 3
    target[12:20, 5:15, 6:16] = 7
    target[0, 0, 0] = 9  # only in the target: not scored
    source = np.zeros_like(target)
    source[2:10, 3:12, 5:15] = 3  # shifted by one voxel
    source[12:20, 5:15, 6:16] = 7
    source[1, 1, 1] = 5  # only in the source
    labels = labels_in_both(target, source)
    assert labels == [3, 7]
    rows = label_overlap(target, source, oblique_geometry, labels, initial=np.zeros_like(target))
    assert [r["label"] for r in rows] == [3, 7]
    assert rows[0]["dice"] == pytest.approx(2 * 8 * 9 * 9 / (2 * 8 * 9 * 10))
    assert rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] == 0.0
    assert rows[0]["hd95_mm"] == pytest.approx(1.5)  # one voxel along x (1.5 mm)
    assert rows[0]["initial_dice"] == 0.0 and math.isnan(rows[0]["initial_hd95_mm"])
    summary = overlap_summary(rows)
    assert summary["n_labels"] == 2
    assert summary["dice_mean"] == pytest.approx((rows[0]["dice"] + 1.0) / 2)
    assert summary["hd95_mean"] == pytest.approx(0.75)
    assert summary["initial_dice_mean"] == 0.0 and math.isnan(summary["initial_hd95_mean"])
