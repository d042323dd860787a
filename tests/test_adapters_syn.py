"""The ITK SyN baseline (and the optional ANTs one): direction of the field, ITK agreement, TRE, CLI."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import Geometry, io
from combireg.errors import CombiregError
from combireg.warp import sample_field_at

from tests.conftest import (ROOT, check_itk_reproduces_warped, image_from_world_function, itk_warp_with_field,
                            known_displacement, oblique_direction, smooth_pattern)

pytest.importorskip("itk")
syn = pytest.importorskip("combireg.adapters.syn")

CASE = ROOT / "data_samples" / "case0000"
#: coarse and fast: SyN's neighbourhood CC costs ~1 s per iteration on a 50x58x50 grid (2 cores)
FAST = dict(shrink_factors=(2, 1), iterations=(30, 30))


def _textured(centre):
    """The smooth test pattern plus a fine texture: local CC cannot see a shift of an image that
    is almost linear inside its 5-voxel window, so the smooth pattern alone barely moves SyN."""
    def func(p):
        r = p - centre
        texture = 0.6 * np.sin(r[..., 0] / 2.2) * np.sin(r[..., 1] / 2.6 + 0.4) * np.sin(r[..., 2] / 3.0 + 0.8)
        return smooth_pattern(p, centre) + texture.astype(np.float32)
    return func


@pytest.fixture(scope="module")
def pair():
    """Target 32x28x24 (spacing 1.5/1.2/2.0, oblique) and a source on *another* oblique grid;
    target(x) = source pattern at x + u(x), u = conftest's known displacement (up to ~2.5 mm)."""
    target_geometry = Geometry((32, 28, 24), origin=(12.0, -7.5, 30.0), spacing=(1.5, 1.2, 2.0),
                               direction=tuple(oblique_direction().ravel()))
    centre = target_geometry.world_grid().reshape(-1, 3).mean(0)
    direction = oblique_direction(-9.0)
    size, spacing = (40, 40, 32), np.array([1.4, 1.3, 1.9])
    half = direction @ ((np.array(size) - 1) * spacing / 2)
    source_geometry = Geometry(size, tuple(centre - half + [1.0, -0.5, 0.7]), tuple(spacing),
                               tuple(direction.ravel()))
    u = known_displacement(target_geometry)
    func = _textured(centre)
    return image_from_world_function(source_geometry, func), image_from_world_function(target_geometry, func, u), u


@pytest.fixture(scope="module")
def result(pair):
    source, target, _ = pair
    return syn.register_syn(source, target, **FAST)


def test_recovers_known_displacement_with_its_sign(pair, result):
    _, target, u = pair
    inner = (slice(5, -5),) * 3  # SyN pins the field's boundary to 0
    err = np.linalg.norm(result.displacement_lps_mm - u, axis=-1)[inner]
    before = np.linalg.norm(u, axis=-1)[inner]
    assert np.median(before) > 1.5
    assert np.median(err) < 0.4 and np.percentile(err, 95) < 1.0  # voxels are 1.2-2.0 mm
    assert result.displacement_lps_mm.shape == target.geometry.shape + (3,)
    # the inverse lives on the source grid and undoes the forward map
    assert result.inverse_displacement_lps_mm.shape == result.source_geometry.shape + (3,)
    back = sample_field_at(result.inverse_displacement_lps_mm, result.source_geometry, result.target_geometry,
                         result.displacement_lps_mm)
    residual = np.linalg.norm(result.displacement_lps_mm + back, axis=-1)[inner]
    assert np.median(residual) < 0.15 and residual.max() < 1.0
    rep = result.report
    assert rep["method"] == "itk_syn" and [lvl["shrink"] for lvl in rep["levels"]] == [2, 1]
    assert all(0 < lvl["iterations"] <= 30 for lvl in rep["levels"])
    assert all(lvl["metric_last"] < lvl["metric_first"] < 0 for lvl in rep["levels"])  # CC is negated
    assert rep["jacobian"]["percent_nonpositive"] == 0.0


def test_itk_resampler_with_written_field_reproduces_warped(tmp_path, pair, result):
    """field.nii.gz applied by ITK's DisplacementFieldTransform + ResampleImageFilter gives warped_0."""
    src_path = tmp_path / "src.nii.gz"
    io.write_image(src_path, pair[0])
    out = result.save(tmp_path / "out")
    ours, theirs = itk_warp_with_field(src_path, out)
    inner = (slice(3, -3),) * 3
    assert np.abs(ours[inner] - theirs[inner]).max() < 1e-3 * np.abs(ours).max()
    field, geometry = io.read_displacement(out / "field.nii.gz")
    assert geometry.same_grid(pair[1].geometry)
    _, inverse_geometry = io.read_displacement(out / "field_inverse.nii.gz")
    assert inverse_geometry.same_grid(pair[0].geometry)
    # params.txt reads back as the settings of the run
    assert syn.read_syn_settings(out / "params.txt") == result.settings


def test_lowers_tre_on_sample_case():
    from combireg.landmarks import compute_tre, read_landmarks

    source = f"{CASE}/source_t1.nii.gz,{CASE}/source_t2.nii.gz"
    target = f"{CASE}/target_t1.nii.gz,{CASE}/target_t2.nii.gz"
    res = syn.register_syn(source, target, shrink_factors=(8, 4), iterations=(50, 30))
    tre = compute_tre(res.displacement_lps_mm, res.target_geometry, read_landmarks(CASE / "target_landmarks.fcsv"),
                      read_landmarks(CASE / "source_landmarks.fcsv")).statistics
    assert tre["initial_mean"] > 4.5  # 4.72 mm
    assert tre["mean"] < 0.45 * tre["initial_mean"] and tre["mean"] < 2.0  # measured 1.47 mm
    assert tre["robustness"] > 0.8
    assert res.warped.num_channels == 2 and res.report["metric_channel"] == 0
    assert res.report["jacobian"]["percent_nonpositive"] < 0.01


def test_settings_validation_and_parameter_files(tmp_path):
    s = syn.SynSettings()
    # default levels now in mm (8 4 2 mm: shrink 8 4 2 on a 1 mm image), affine stage first
    assert s.shrink_factors is None and s.shrink_spacing == (8.0, 4.0, 2.0)
    assert s.iterations == (100, 70, 20) and s.cc_radius == 2 and s.pre_alignment == "affine"
    text = s.to_text()
    assert "(ShrinkSpacing 8.0 4.0 2.0)" in text and "(MaximumNumberOfIterations 100 70 20)" in text
    assert '(PreAlignment "affine")' in text and "(ShrinkFactors" not in text
    path = tmp_path / "p.txt"
    path.write_text(text)
    assert syn.read_syn_settings(path) == s
    voxels = s.with_changes(shrink_factors=(4, 2, 1), pre_alignment="none")
    assert voxels.shrink_spacing is None and "(ShrinkFactors 4 2 1)" in voxels.to_text()
    path.write_text(voxels.to_text())
    assert syn.read_syn_settings(path) == voxels
    with pytest.raises(CombiregError, match="not both"):
        syn.SynSettings(shrink_factors=(2,), shrink_spacing=(2.0,), iterations=(5,))
    with pytest.raises(CombiregError, match="pre_alignment"):
        syn.SynSettings(pre_alignment="similarity")
    with pytest.raises(CombiregError, match="iterations: 2 value"):
        syn.SynSettings(shrink_factors=(4, 2, 1), iterations=(10, 10))
    with pytest.raises(CombiregError, match="cc_radius"):
        syn.SynSettings(cc_radius=0)
    path.write_text("(ShrinkFactors 4 2)\n(MaximumNumberOfIterations 10 10)\n(CCRadios 3)\n")
    with pytest.raises(CombiregError, match=r"p\.txt:3: unknown SyN key 'CCRadios'"):
        syn.read_syn_settings(path)
    path.write_text("(ShrinkFactors 4 2)\n(MaximumNumberOfIterations 10)\n")
    with pytest.raises(CombiregError, match=r"p\.txt:2: iterations: 1 value"):
        syn.read_syn_settings(path)
    path.write_text("(ShrinkFactors 4 two)\n")
    with pytest.raises(CombiregError, match=r"p\.txt:1: ShrinkFactors expects integers"):
        syn.read_syn_settings(path)


# ------------------------------------------------------------------------------ affine stage, levels in mm
@pytest.fixture(scope="module")
def posed():
    """A textured object rotated 12 degrees about an oblique axis and shifted 10 mm (target x ->
    source x + truth(x)), on an anisotropic oblique grid; SyN with and without the affine stage."""
    geometry = Geometry((40, 40, 32), origin=(10.0, -5.0, 20.0), spacing=(1.5, 1.5, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    points = geometry.world_grid()
    centre = points.reshape(-1, 3).mean(0)
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(12.0)
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    truth = (points - centre) @ rotation.T + centre + np.array([6.0, -8.0, 0.0]) - points
    textured = _textured(centre)
    func = lambda p: textured(p) * np.exp(-((p - centre) ** 2).sum(-1) / (2 * 16.0 ** 2))  # noqa: E731
    source = image_from_world_function(geometry, func)
    target = image_from_world_function(geometry, func, truth)
    levels = dict(shrink_spacing=(6.0, 3.0), iterations=(30, 20))
    with_affine = syn.register_syn(source, target, **levels)
    alone = syn.register_syn(source, target, pre_alignment="none", **levels)
    near = np.linalg.norm(points - centre, axis=-1) < 15.0  # the object
    return source, truth, near, with_affine, alone


def test_affine_stage_recovers_a_pose_syn_alone_does_not(posed):
    source, truth, near, with_affine, alone = posed
    before = np.linalg.norm(truth, axis=-1)[near]
    error = np.linalg.norm(with_affine.displacement_lps_mm - truth, axis=-1)[near]
    error_alone = np.linalg.norm(alone.displacement_lps_mm - truth, axis=-1)[near]
    assert before.mean() > 9.5  # 10.1 mm
    # measured 0.32 mean, 0.66 p95 (voxels 1.5-2 mm); SyN alone 1.64 mean, 4.3 p95
    assert error.mean() < 0.6 and np.percentile(error, 95) < 1.2
    assert error_alone.mean() > 2.5 * error.mean() and np.percentile(error_alone, 95) > 2.5
    report = with_affine.report
    assert report["pre_alignment"]["kind"] == "affine" and alone.report["pre_alignment"]["affine_target_to_source_lps_mm"] is None
    affine = np.array(report["pre_alignment"]["affine_target_to_source_lps_mm"])
    moved = (np.c_[source.geometry.world_grid()[near], np.ones(near.sum())] @ affine.T)[:, :3]
    assert np.linalg.norm(moved - (source.geometry.world_grid() + truth)[near], axis=-1).mean() < 1.0
    # levels in mm, per axis: 6 and 3 mm on a 1.5/1.5/2.0 mm grid
    assert [lvl["target_factors_xyz"] for lvl in report["levels"]] == [[4.0, 4.0, 3.0], [2.0, 2.0, 1.5]]
    assert [lvl["shrink_spacing_mm"] for lvl in report["levels"]] == [6.0, 3.0]
    assert report["levels"][1]["grid_size"] == [20, 20, 22]  # ceil(size / factor)
    # the written inverse (source grid) undoes the whole map, affine included
    back = sample_field_at(with_affine.inverse_displacement_lps_mm, with_affine.source_geometry,
                           with_affine.target_geometry, with_affine.displacement_lps_mm)
    assert np.median(np.linalg.norm(with_affine.displacement_lps_mm + back, axis=-1)[near]) < 0.3


def test_posed_field_reproduces_warped_through_itk(tmp_path, posed):
    source, _, _, with_affine, _ = posed
    out = check_itk_reproduces_warped(tmp_path, source, with_affine)
    assert syn.read_syn_settings(out / "params.txt") == with_affine.settings


# ------------------------------------------------------------------------------ CLI
def _write_channels(tmp_path, images, side):
    paths = []
    for k, img in enumerate(images):
        p = tmp_path / f"{side}{k}.nii.gz"
        io.write_image(p, img)
        paths.append(str(p))
    return ",".join(paths)


def _one_line_error(res, out, fragment):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("combireg: error:") and fragment in lines[0], res.output
    assert not out.exists()


def test_cli_syn_two_channels_writes_the_run_outputs(tmp_path, pair):
    from combireg.cli.main import main

    source, target, _ = pair
    src = _write_channels(tmp_path, [source, source], "src")
    tgt = _write_channels(tmp_path, [target, target], "tgt")
    out = tmp_path / "out"
    args = ["baseline", "syn", src, tgt, "-o", str(out), "--shrink", "2", "--iterations", "10"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "registered with ITK SyN" in res.output and f"results in {out}" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["field.nii.gz", "field_inverse.nii.gz", "params.txt",
                                                    "report.json", "warped_0.nii.gz", "warped_1.nii.gz"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "itk_syn" and report["settings"]["shrink_factors"] == [2]
    assert syn.read_syn_settings(out / "params.txt").iterations == (10,)
    # not empty without --overwrite; params.txt reproduces the run
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "not empty" in res.output
    again = tmp_path / "again"
    res = CliRunner().invoke(main, ["baseline", "syn", src, tgt, "-o", str(again), "-p", str(out / "params.txt")])
    assert res.exit_code == 0, res.output
    assert json.loads((again / "report.json").read_text())["settings"] == report["settings"]


@pytest.mark.parametrize("case", ["missing", "channels", "iterations", "params", "levels"])
def test_cli_syn_bad_input_is_one_line(tmp_path, pair, case):
    from combireg.cli.main import main

    source, target, _ = pair
    src = _write_channels(tmp_path, [source], "src")
    tgt = _write_channels(tmp_path, [target], "tgt")
    extra, fragment = [], ""
    if case == "missing":
        src, fragment = str(tmp_path / "nope.nii.gz"), "no such file"
    elif case == "channels":
        tgt, fragment = f"{tgt},{tgt}", "source has 1 channel(s) but target has 2"
    elif case == "iterations":
        extra, fragment = ["--shrink", "4,2", "--iterations", "5"], "iterations: 1 value"
    elif case == "params":
        bad = tmp_path / "bad.txt"
        bad.write_text("(LearningRate -1)\n")
        extra, fragment = ["-p", str(bad)], "bad.txt:1: learning_rate"
    elif case == "levels":
        extra, fragment = ["--shrink", "2", "--shrink-mm", "4", "--iterations", "5"], "--shrink-mm or --shrink, not both"
    out = tmp_path / "result" / "out"
    res = CliRunner().invoke(main, ["baseline", "syn", src, tgt, "-o", str(out), *extra])
    _one_line_error(res, tmp_path / "result", fragment)


# ------------------------------------------------------------------------------ ANTs (optional)
HAVE_ANTS = importlib.util.find_spec("ants") is not None


@pytest.mark.skipif(HAVE_ANTS, reason="antspyx is installed")
def test_cli_ants_without_antspyx_is_one_line(tmp_path, pair):
    from combireg.cli.main import main

    src = _write_channels(tmp_path, [pair[0]], "src")
    tgt = _write_channels(tmp_path, [pair[1]], "tgt")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["baseline", "ants", src, tgt, "-o", str(out)])
    _one_line_error(res, out, "baseline ants needs the optional package antspyx (pip install antspyx)")
    from combireg.adapters.ants import register_ants

    with pytest.raises(CombiregError, match="antspyx"):
        register_ants(src, tgt)


def test_ants_fields_follow_our_convention(tmp_path):
    """With antspyx: a pure translation is recovered with its sign, and ITK's resampler with the
    written field reproduces warped_0."""
    pytest.importorskip("ants")
    from combireg.adapters.ants import register_ants

    geometry = Geometry((40, 40, 40), origin=(-30.0, -30.0, -30.0), spacing=(1.5, 1.5, 1.5),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    shift = np.array([2.0, -1.5, 1.0])
    func = _textured(centre)
    source = image_from_world_function(geometry, func)
    target = image_from_world_function(geometry, func, np.broadcast_to(shift, geometry.shape + (3,)))
    res = register_ants(source, target, type_of_transform="SyNOnly", seed=1,
                        registration_kwargs={"reg_iterations": (40, 20, 0)})
    inner = (slice(8, -8),) * 3
    assert np.median(np.linalg.norm(res.displacement_lps_mm[inner] - shift, axis=-1)) < 0.5
    assert np.median(np.linalg.norm(res.inverse_displacement_lps_mm[inner] + shift, axis=-1)) < 0.5
    src_path = tmp_path / "src.nii.gz"
    io.write_image(src_path, source)
    out = res.save(tmp_path / "out")
    ours, theirs = itk_warp_with_field(src_path, out)
    assert np.abs(ours[inner] - theirs[inner]).max() < 1e-3 * np.abs(ours).max()
