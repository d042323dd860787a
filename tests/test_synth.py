"""Tests of the pre-/post-operative pair simulator (combireg.synth) on a small phantom."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from combireg import Geometry, Image, io, synth
from combireg.errors import CombiregError
from combireg.landmarks import Landmarks, read_fcsv

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"

# Phantom layers by normalised ellipsoidal radius: (outer radius, T1, T2), template-like 0..10000.
_LAYERS = [(0.76, 0.88, 0.38), (0.84, 0.60, 0.55), (0.92, 0.15, 0.95), (0.96, 0.05, 0.05), (1.0, 0.85, 0.75)]
_HEAD_SEMI_AXES = np.array([54.0, 60.0, 54.0])


def _rotation(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _phantom() -> tuple[Image, np.ndarray, Landmarks]:
    """A 40^3 two-channel head phantom on an anisotropic, oblique, flipped grid."""
    direction = _rotation([1.0, 2.0, 3.0], 20.0) @ np.diag([-1.0, -1.0, 1.0])
    spacing = np.array([3.2, 3.6, 4.0])
    size = np.array([40, 40, 40])
    centre = np.array([2.0, -15.0, 10.0])  # world position of the head centre
    origin = centre - direction @ (spacing * (size - 1) / 2.0)
    geometry = Geometry(tuple(size), tuple(origin), tuple(spacing), tuple(direction.ravel()))
    r = geometry.world_grid() - centre
    s = np.linalg.norm(r / _HEAD_SEMI_AXES, axis=-1)
    t1 = np.full(geometry.shape, 0.03)
    t2 = np.full(geometry.shape, 0.03)
    for outer, v1, v2 in reversed(_LAYERS):
        t1[s < outer], t2[s < outer] = v1, v2
    for side in (-1.0, 1.0):  # lateral ventricles
        vent = np.linalg.norm((r - [side * 10.0, 0.0, 5.0]) / [5.0, 16.0, 7.0], axis=-1) < 1.0
        t1[vent], t2[vent] = 0.15, 0.95
    texture = 1.0 + 0.05 * np.sin(r[..., 0] / 5.0) * np.cos(r[..., 1] / 7.0) * np.sin(r[..., 2] / 6.0 + 0.4)
    data = np.stack([ndi.gaussian_filter(t1 * texture, 0.5), ndi.gaussian_filter(t2 * texture, 0.5)]) * 10000
    brain = s < 0.84
    afids = Landmarks(np.array([[0, 20, 0], [0, -20, 0], [25, 0, 10], [-25, 0, 10], [0, 0, -20],
                                [10, 10, 10], [-10, -30, 5], [30, -10, -10]], dtype=float) + centre,
                      [str(i) for i in range(1, 9)])
    return Image(torch.from_numpy(data.astype(np.float32)), geometry), brain, afids


def _simulate(seed: int = 3, **kwargs) -> synth.SimulatedCase:
    template, brain, afids = _phantom()
    options = dict(seed=seed, spacing=2.0, n_tissue_points=40, brain_mask=brain, tumour_radius_mm=(8.0, 10.0))
    options.update(kwargs)
    return synth.simulate_case(template, afids, **options)


@pytest.fixture(scope="module")
def case() -> synth.SimulatedCase:
    return _simulate()


def _trilinear(field: np.ndarray, geometry: Geometry, points: np.ndarray) -> np.ndarray:
    coords = geometry.world_to_index(points)[:, ::-1].T
    return np.stack([ndi.map_coordinates(field[..., c], coords, order=1) for c in range(3)], axis=1)


# ----------------------------------------------------------------------------- simulated case
def test_case_inverse_residual_is_tiny(case):
    residual = case.info["inverse_residual_max_mm"]
    assert residual["source"] < 0.01 and residual["target"] < 0.01


def test_ground_truth_field_maps_target_landmarks_onto_source_landmarks(case, tmp_path):
    synth.write_case(case, tmp_path / "c", write_ground_truth=True)
    field, geometry = io.read_displacement(tmp_path / "c" / synth.CASE_FILES["ground_truth"])
    assert geometry.same_grid(case.target.geometry)
    target = read_fcsv(tmp_path / "c" / "target_landmarks.fcsv")
    source = read_fcsv(tmp_path / "c" / "source_landmarks.fcsv")
    assert target.labels == source.labels
    mapped = target.points_lps_mm + _trilinear(field, geometry, target.points_lps_mm)
    error = np.linalg.norm(mapped - source.points_lps_mm, axis=1)
    assert error.max() < 0.05


def test_misalignment_and_mass_effect_are_present(case):
    distance = np.linalg.norm(case.target_landmarks.points_lps_mm - case.source_landmarks.points_lps_mm, axis=1)
    assert distance.mean() > 1.0
    assert case.info["mass_effect_peak_mm"] > 1.0 and case.info["collapse_peak_mm"] > 1.0
    assert np.abs(case.info["rigid"]["rotation_deg_xyz"]).max() > 0.1
    assert np.abs(case.info["rigid"]["translation_lps_mm"]).max() > 0.1


def test_landmarks_lie_in_both_grids_and_away_from_the_tumour(case):
    assert len(case.source_landmarks) == case.info["landmarks"]["total"]
    assert case.info["landmarks"]["tissue"] == 40
    for lm, image in ((case.source_landmarks, case.source), (case.target_landmarks, case.target)):
        assert image.geometry.contains_index(image.geometry.world_to_index(lm.points_lps_mm)).all()
    centre = np.asarray(case.info["tumour"]["centre_source_lps_mm"])
    # The push only moves tissue away from the centre, so the template-space exclusion holds here too.
    near = np.linalg.norm(case.source_landmarks.points_lps_mm - centre, axis=1)
    assert near.min() > case.info["tumour"]["landmark_exclusion_radius_mm"] - 2.5


def test_afid_at_the_tumour_centre_is_excluded(case):
    template, brain, afids = _phantom()
    centre = np.asarray(case.info["tumour"]["centre_template_lps_mm"])
    afids = Landmarks(np.vstack([afids.points_lps_mm, centre]), afids.labels + ["at_tumour"])
    again = synth.simulate_case(template, afids, seed=3, spacing=2.0, n_tissue_points=40, brain_mask=brain,
                                tumour_radius_mm=(8.0, 10.0))
    assert "at_tumour" in again.info["landmarks"]["afids_excluded_near_tumour"]
    assert "at_tumour" not in again.source_landmarks.labels
    # The extra AFID does not change the images: each random choice has its own stream.
    np.testing.assert_array_equal(again.target.numpy(), case.target.numpy())


def test_simulation_is_deterministic(case):
    again = _simulate(seed=3)
    np.testing.assert_array_equal(again.source.numpy(), case.source.numpy())
    np.testing.assert_array_equal(again.target.numpy(), case.target.numpy())
    np.testing.assert_array_equal(again.target_landmarks.points_lps_mm, case.target_landmarks.points_lps_mm)
    np.testing.assert_array_equal(again.displacement_lps_mm, case.displacement_lps_mm)
    other = _simulate(seed=4)
    assert not np.array_equal(other.target.numpy(), case.target.numpy())


def test_output_grid_keeps_template_direction_and_origin(case):
    template, _, _ = _phantom()
    g = case.target.geometry
    assert g.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(g.direction, template.geometry.direction)
    np.testing.assert_allclose(g.origin, template.geometry.origin)
    assert np.all(g.extent_mm <= template.geometry.extent_mm + 1e-6)
    assert case.source.geometry.same_grid(g)
    assert case.source.num_channels == case.target.num_channels == 2


def test_oblique_source_grid_keeps_exact_ground_truth():
    case = _simulate(seed=5, oblique_source=True, spacing=2.5, n_tissue_points=20)
    assert not np.allclose(case.source.geometry.direction, case.target.geometry.direction)
    g = case.target.geometry
    mapped = case.target_landmarks.points_lps_mm + _trilinear(case.displacement_lps_mm, g,
                                                              case.target_landmarks.points_lps_mm)
    assert np.linalg.norm(mapped - case.source_landmarks.points_lps_mm, axis=1).max() < 0.05


def test_estimated_brain_mask_finds_the_phantom_brain():
    template, brain, _ = _phantom()
    estimate = synth.estimate_brain_mask(template)
    dice = 2 * (estimate & brain).sum() / (estimate.sum() + brain.sum())
    assert dice > 0.8


def test_bad_template_is_a_user_error():
    template, brain, afids = _phantom()
    with pytest.raises(CombiregError, match="2 channels"):
        synth.simulate_case(template.channel(0), afids, seed=0, brain_mask=brain)
    with pytest.raises(CombiregError, match="brain_mask shape"):
        synth.simulate_case(template, afids, seed=0, brain_mask=brain[1:])


# ----------------------------------------------------------------------------- datasets and CLI
@pytest.fixture
def phantom_source(monkeypatch):
    template, _, afids = _phantom()
    monkeypatch.setattr(synth, "fetch_template", lambda cache_dir=None: (template, afids))


def test_generate_dataset_writes_cases_manifest_and_notice(tmp_path, phantom_source):
    out = tmp_path / "set"
    manifest = synth.generate_dataset(out, n_cases=2, seed=7, spacing=3.0, n_tissue_points=10,
                                      write_ground_truth=False)
    assert manifest == out / "manifest.csv"
    rows = list(csv.reader(manifest.open()))
    assert tuple(rows[0]) == synth.MANIFEST_HEADER
    assert [r[0] for r in rows[1:]] == ["case0007", "case0008"]
    for row in rows[1:]:
        for rel in row[1].split(",") + row[2].split(",") + row[3:]:
            assert (out / rel).is_file()
        assert not (out / row[0] / "gt_field.nii.gz").exists()
        info = json.loads((out / row[0] / "case.json").read_text())
        assert info["seed"] == int(row[0][4:])
    assert "CC BY 4.0" in (out / "NOTICE.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary directories left


def test_generate_dataset_refuses_a_non_empty_directory(tmp_path, phantom_source):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CombiregError, match="not empty"):
        synth.generate_dataset(out, n_cases=1, spacing=4.0, n_tissue_points=5)
    assert (out / "keep.txt").exists()
    synth.generate_dataset(out, n_cases=1, spacing=4.0, n_tissue_points=5, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").is_file()


def test_synth_command(tmp_path, phantom_source):
    from click.testing import CliRunner

    try:
        from combireg.cli.synth_cmd import synth as command
    except ImportError:  # a source checkout that is not installed
        from cli.synth_cmd import synth as command
    out = tmp_path / "cli"
    result = CliRunner().invoke(command, ["-o", str(out), "--cases", "1", "--spacing", "4", "--tissue-points", "5"])
    assert result.exit_code == 0, result.output
    assert "manifest.csv" in result.output and (out / "case0000" / "gt_field.nii.gz").is_file()
    again = CliRunner().invoke(command, ["-o", str(out), "--cases", "1", "--spacing", "4"])
    assert isinstance(again.exception, CombiregError)


# ----------------------------------------------------------------------------- committed samples
@pytest.mark.skipif(not (SAMPLES / "manifest.csv").is_file(), reason="data_samples not generated")
def test_committed_samples_are_consistent():
    assert (SAMPLES / "NOTICE.md").is_file()
    rows = list(csv.DictReader((SAMPLES / "manifest.csv").open()))
    assert len(rows) == 2
    row = rows[0]
    case_dir = SAMPLES / row["id"]
    for key in ("source_t1", "source_t2", "target_t1", "target_t2", "source_landmarks", "target_landmarks", "info"):
        assert (case_dir / synth.CASE_FILES[key]).is_file()
    info = json.loads((case_dir / "case.json").read_text())
    source = read_fcsv(SAMPLES / row["source_landmarks"])
    target = read_fcsv(SAMPLES / row["target_landmarks"])
    assert source.labels == target.labels and len(source) == info["landmarks"]["total"]
    assert info["landmarks"]["afids"] + len(info["landmarks"]["afids_excluded_near_tumour"]) <= 32
    # Corresponding points show the same tissue: T1 at the landmarks agrees in rank (the
    # post-op contrast remap is monotone).
    src = io.read_image(SAMPLES / row["source"].split(",")[0])
    tgt = io.read_image(SAMPLES / row["target"].split(",")[0])
    values = []
    for image, lm in ((src, source), (tgt, target)):
        coords = image.geometry.world_to_index(lm.points_lps_mm)[:, ::-1].T
        values.append(ndi.map_coordinates(image.numpy()[0], coords, order=1))
    ranks = [np.argsort(np.argsort(v)) for v in values]
    assert np.corrcoef(*ranks)[0, 1] > 0.6
