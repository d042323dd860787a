"""The elastix baseline adapter: accuracy on a known shift, ITK agreement, CLI outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from combireg import Geometry, Image, io
from combireg.errors import CombiregError

from tests.conftest import (ROOT, check_itk_reproduces_warped, image_from_world_function, itk_warp_with_field,
                            oblique_direction, smooth_pattern)

pytest.importorskip("itk")
elastix = pytest.importorskip("combireg.adapters.elastix")

SHIFT = np.array([2.0, -1.5, 1.0])  # LPS mm: target point x shows source point x + SHIFT


def _fast_map() -> dict:
    """The default B-spline map, made fast for tiny volumes (2 levels, 50 iterations)."""
    pm = elastix.default_parameter_map()
    pm.update(NumberOfResolutions=["2"], GridSpacingSchedule=["2", "1"], MaximumNumberOfIterations=["50"],
              FinalGridSpacingInPhysicalUnits=["12"], NumberOfSpatialSamples=["3000"])
    return pm


@pytest.fixture(scope="module")
def pair():
    """24^3 source and target (anisotropic spacing, oblique direction), 1 or 2 channels."""
    geometry = Geometry((24, 24, 24), origin=(10.0, -5.0, 20.0), spacing=(1.5, 1.2, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    second = lambda p: np.cos(((p - centre) ** 2).sum(-1) / 150.0).astype(np.float32)  # noqa: E731
    shift = np.broadcast_to(SHIFT, geometry.shape + (3,))
    src = [image_from_world_function(geometry, lambda p: smooth_pattern(p, centre)),
           image_from_world_function(geometry, second)]
    tgt = [image_from_world_function(geometry, lambda p: smooth_pattern(p, centre), shift),
           image_from_world_function(geometry, second, shift)]
    return src, tgt


@pytest.fixture(scope="module")
def fast_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "fast.txt"
    path.write_text(elastix.format_elastix_map(_fast_map()))
    return path


@pytest.fixture(scope="module")
def result(pair, fast_params):
    src, tgt = pair
    return elastix.register_elastix(src[0], tgt[0], parameter_file=fast_params)


def test_recovers_known_shift(result):
    u = result.displacement_lps_mm
    inner = (slice(6, -6),) * 3
    err = np.linalg.norm(u[inner] - SHIFT, axis=-1)
    assert err.max() < 0.5 * min(result.target_geometry.spacing)
    assert result.report["method"] == "elastix_bspline"
    # the inverse maps back: on this translation it is about -SHIFT
    v = result.inverse_displacement_lps_mm
    assert np.linalg.norm(v[inner] + SHIFT, axis=-1).max() < 0.6


def test_itk_resampler_with_written_field_reproduces_warped(tmp_path, pair, result):
    """The written field applied by ITK's DisplacementFieldTransform gives warped_0."""
    src_path = tmp_path / "src.nii.gz"
    io.write_image(src_path, pair[0][0])
    out = result.save(tmp_path / "out")
    ours, theirs = itk_warp_with_field(src_path, out)
    inner = (slice(3, -3),) * 3
    assert np.abs(ours[inner] - theirs[inner]).max() < 1e-3 * np.abs(ours).max()


def test_expand_for_channels():
    pm = elastix.default_parameter_map()
    assert elastix.expand_for_channels(pm, 1) == pm
    two = elastix.expand_for_channels(pm, 2)
    assert two["Metric"] == ["AdvancedMattesMutualInformation"] * 2 + ["TransformBendingEnergyPenalty"]
    assert [float(two[f"Metric{i}Weight"][0]) for i in range(3)] == [0.5, 0.5, 1.0]
    assert all(len(two[k]) == 3 for k in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler"))
    assert elastix.expand_for_channels(two, 2) == two  # params.txt of a run reads back unchanged
    with pytest.raises(CombiregError, match="image metric"):
        elastix.expand_for_channels(two, 3)


def test_shipped_parameter_file_is_the_default_map():

    assert elastix.read_parameter_map(ROOT / "params" / "elastix_bspline.txt") == elastix.default_parameter_map()


def test_cli_two_channels_writes_the_run_outputs(tmp_path, pair, fast_params):
    from cli.main import main

    src, tgt = pair
    paths = {}
    for side, images in (("src", src), ("tgt", tgt)):
        paths[side] = []
        for k, img in enumerate(images):
            p = tmp_path / f"{side}{k}.nii.gz"
            io.write_image(p, img)
            paths[side].append(str(p))
    out = tmp_path / "out"
    args = ["baseline", "elastix", ",".join(paths["src"]), ",".join(paths["tgt"]), "-o", str(out),
            "-p", str(fast_params)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["field.nii.gz", "field_inverse.nii.gz", "params.txt",
                                                    "report.json", "warped_0.nii.gz", "warped_1.nii.gz"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "elastix_bspline" and report["image_pairs"] == 3
    used = elastix.read_parameter_map(out / "params.txt")
    assert used["Metric"][:2] == ["AdvancedMattesMutualInformation"] * 2
    field, geometry = io.read_displacement(out / "field.nii.gz")
    assert geometry.same_grid(src[0].geometry)
    # not empty without --overwrite
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "not empty" in res.output


def test_cli_bad_parameter_file(tmp_path, pair):
    from cli.main import main

    src, tgt = pair
    io.write_image(tmp_path / "s.nii.gz", src[0])
    io.write_image(tmp_path / "t.nii.gz", tgt[0])
    bad = tmp_path / "bad.txt"
    bad.write_text('(Transform "BSplineTransform"\n(Metric oops\n')
    res = CliRunner().invoke(main, ["baseline", "elastix", str(tmp_path / "s.nii.gz"), str(tmp_path / "t.nii.gz"),
                                    "-o", str(tmp_path / "o"), "-p", str(bad)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("combireg: error:") and "bad.txt" in lines[0]
    assert not (tmp_path / "o").exists()
    # a bad map after a good one (-p is repeatable): the same, before any work
    good = tmp_path / "good.txt"
    good.write_text(elastix.format_elastix_map(elastix.default_parameter_map()))
    res = CliRunner().invoke(main, ["baseline", "elastix", str(tmp_path / "s.nii.gz"), str(tmp_path / "t.nii.gz"),
                                    "-o", str(tmp_path / "o"), "-p", str(good), "-p", str(bad)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "bad.txt" in res.output
    assert not (tmp_path / "o").exists()


def test_elastix_failure_is_one_line_error(tmp_path, pair):
    src, tgt = pair
    bad = tmp_path / "unknown.txt"
    bad.write_text('(Transform "NoSuchTransform")\n(Metric "AdvancedMeanSquares")\n')
    with pytest.raises(CombiregError, match="elastix failed") as info:
        elastix.register_elastix(src[0], tgt[0], parameter_file=bad)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ the chain, pyramids in mm
def test_mm_pyramid_schedules_follow_the_spacing():
    """Levels 8 4 2 1 mm: elastix's default on 1 mm, halved factors on 2 mm, the 4 mm slice axis kept."""
    def grid(spacing):
        return Geometry((20, 20, 20), spacing=spacing, direction=tuple(oblique_direction().ravel()))

    assert elastix.mm_pyramid_schedule(4, grid((1.0, 1.0, 1.0))) == [[8, 8, 8], [4, 4, 4], [2, 2, 2], [1, 1, 1]]
    assert elastix.mm_pyramid_schedule(4, grid((2.0, 2.0, 2.0))) == [[4, 4, 4], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
    assert elastix.mm_pyramid_schedule(4, grid((1.0, 1.0, 4.0))) == [[8, 8, 2], [4, 4, 1], [2, 2, 1], [1, 1, 1]]
    # 8/1.5 = 5.33 -> 5, 8/1.2 = 6.67 -> 7 (integers: elastix reads unsigned schedules)
    assert elastix.mm_pyramid_schedule(3, grid((1.5, 1.2, 2.0))) == [[3, 3, 2], [1, 2, 1], [1, 1, 1]]
    # fixed from the target's spacing, moving from the source's; one the map sets itself is kept
    pm = elastix.default_parameter_map()
    out, info = elastix.with_mm_schedules(pm, grid((1.0, 1.0, 4.0)), grid((2.0, 2.0, 2.0)))
    assert out["FixedImagePyramidSchedule"] == "8 8 2 4 4 1 2 2 1 1 1 1".split()
    assert out["MovingImagePyramidSchedule"] == "4 4 4 2 2 2 1 1 1 1 1 1".split()
    assert info["fixed"]["from"] == "mm levels 8 4 2 1" and info["moving"]["schedule_xyz"][0] == [4, 4, 4]
    pm["FixedImagePyramidSchedule"] = ["4"] * 3 + ["2"] * 3 + ["1"] * 6
    out, info = elastix.with_mm_schedules(pm, grid((1.0, 1.0, 4.0)), grid((2.0, 2.0, 2.0)))
    assert out["FixedImagePyramidSchedule"] == pm["FixedImagePyramidSchedule"]
    assert info["fixed"]["from"] == "parameter file (FixedImagePyramidSchedule)"
    assert "MovingImagePyramidSchedule" in out
    pm["ImagePyramidSchedule"] = pm.pop("FixedImagePyramidSchedule")
    out, _ = elastix.with_mm_schedules(pm, grid((1.0, 1.0, 4.0)), grid((2.0, 2.0, 2.0)))
    assert "FixedImagePyramidSchedule" not in out and "MovingImagePyramidSchedule" not in out


def test_shipped_chain_files_are_the_default_maps():
    maps = elastix.default_parameter_maps()
    files = [elastix.read_parameter_map(ROOT / f) for f in elastix.DEFAULT_PARAMETER_FILES]
    assert files == maps
    assert [m["Transform"] for m in maps] == [["EulerTransform"], ["AffineTransform"], ["BSplineTransform"]]
    assert maps[0]["AutomaticTransformInitializationMethod"] == ["CenterOfGravity"]
    assert elastix.method_name(maps) == elastix.METHOD == "elastix_rigid_affine_bspline"
    assert elastix.method_name(maps[2:]) == "elastix_bspline"


def test_chain_maps_take_the_same_image_pairs(tmp_path):
    """Two channels: every map gets 3 metrics (the rigid and affine ones padded with an unused
    metric), and a chain's params.txt reads back as the same maps (padding and schedules kept)."""
    target = Geometry((20, 20, 20), spacing=(1.0, 1.0, 4.0))
    source = Geometry((20, 20, 20), spacing=(2.0, 2.0, 2.0))
    maps, pairs, info = elastix.prepare_chain(elastix.default_parameter_maps(), 2, target, source)
    assert pairs == 3 and [len(m["Metric"]) for m in maps] == [3, 3, 3]
    rigid = maps[0]
    assert rigid["Metric2Use"] == ["false"] and float(rigid["Metric2Weight"][0]) == 0.0
    assert [float(rigid[f"Metric{i}Weight"][0]) for i in range(2)] == [0.5, 0.5]
    assert all(len(rigid[k]) == 3 for k in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler"))
    assert maps[2]["Metric"][2] == "TransformBendingEnergyPenalty" and "Metric2Use" not in maps[2]
    assert [i["fixed"]["schedule_xyz"][0] for i in info] == [[8, 8, 2]] * 3
    path = tmp_path / "params.txt"
    path.write_text("// a comment\n" + elastix.format_elastix_maps(maps))
    again = elastix.read_parameter_maps(path)
    assert again == maps
    assert elastix.prepare_chain(again, 2, target, source)[0] == maps
    with pytest.raises(CombiregError, match="expected one elastix parameter map, got 3"):
        elastix.read_parameter_map(path)


def _textured_object(centre, amplitude=1.5):
    """A fine texture (period ~14-19 mm) on a compact object: the B-spline map alone, started from
    the identity, locks onto a wrong period under a 10 degree, 8 mm pose."""
    def func(p):
        q = p - centre
        texture = amplitude * np.sin(q[..., 0] / 2.2) * np.sin(q[..., 1] / 2.6 + 0.4) * np.sin(q[..., 2] / 3.0 + 0.8)
        return ((0.3 * smooth_pattern(p, centre) + texture) * np.exp(-(q ** 2).sum(-1) / (2 * 12.0 ** 2))) \
            .astype(np.float32)
    return func


def _fast_chain(tmp_path) -> list:
    """The default chain, made fast for tiny volumes (3 levels, 100 iterations, fixed seed)."""
    paths = []
    for name, pm in zip(("rigid", "affine", "bspline"), elastix.default_parameter_maps()):
        pm.update(NumberOfResolutions=["3"], MaximumNumberOfIterations=["100"], WriteResultImage=["false"],
                  RandomSeed=["121212"])
        if name == "bspline":
            pm.update(GridSpacingSchedule=["4", "2", "1"], FinalGridSpacingInPhysicalUnits=["12"])
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(elastix.format_elastix_map(pm))
    return paths


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    """A source rotated 10 degrees about an oblique axis and shifted 8 mm, plus a smooth
    deformation (up to 1.8 mm), two channels, on an anisotropic oblique grid; the chain and the
    B-spline map alone registered."""
    geometry = Geometry((40, 40, 32), origin=(10.0, -5.0, 20.0), spacing=(1.5, 1.5, 2.0),
                        direction=tuple(oblique_direction().ravel()))
    points = geometry.world_grid()
    centre = points.reshape(-1, 3).mean(0)
    r = points - centre
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(10.0)
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    bump = np.zeros_like(points)
    bump[..., 0] = 1.5 * np.sin(r[..., 1] / 10.0)
    bump[..., 2] = 1.0 * np.cos(r[..., 0] / 9.0)
    truth = (r + bump) @ rotation.T + centre + np.array([4.8, -6.4, 0.0]) - points  # target x -> source x + truth
    channels = [_textured_object(centre), _textured_object(centre, amplitude=1.0)]
    source = Image(torch.cat([image_from_world_function(geometry, f).data for f in channels]), geometry)
    target = Image(torch.cat([image_from_world_function(geometry, f, truth).data for f in channels]), geometry)
    paths = _fast_chain(tmp_path_factory.mktemp("chain"))
    chain = elastix.register_elastix(source, target, parameter_file=paths)
    alone = elastix.register_elastix(source, target, parameter_file=paths[2])
    near = np.linalg.norm(r, axis=-1) < 15.0  # the object
    return source, target, truth, near, chain, alone, paths


def test_chain_recovers_a_pose_the_bspline_map_alone_does_not(posed):
    _, _, truth, near, chain, alone, _ = posed
    before = np.linalg.norm(truth, axis=-1)[near]
    error = np.linalg.norm(chain.displacement_lps_mm - truth, axis=-1)[near]
    error_alone = np.linalg.norm(alone.displacement_lps_mm - truth, axis=-1)[near]
    assert before.mean() > 7.5  # 8.2 mm
    # within half a voxel (1.5 mm) on average; measured 0.49 mean, 0.73 p95
    assert error.mean() < 0.75 and np.percentile(error, 95) < 1.2
    assert error_alone.mean() > 3.0 * error.mean()  # measured 10.6 mm: a wrong texture period
    rep = chain.report
    assert rep["method"] == "elastix_rigid_affine_bspline" and rep["image_pairs"] == 3
    assert [m["transform"] for m in rep["parameter_maps"]] == ["EulerTransform", "AffineTransform", "BSplineTransform"]
    # 3 levels = 4 2 1 mm on a 1.5/1.5/2.0 mm grid
    assert rep["parameter_maps"][0]["fixed"]["schedule_xyz"] == [[3, 3, 2], [1, 1, 1], [1, 1, 1]]
    assert alone.report["method"] == "elastix_bspline"
    # the inverse undoes the chain on the object
    from combireg.warp import sample_field_at

    back = sample_field_at(chain.inverse_displacement_lps_mm, chain.source_geometry, chain.target_geometry,
                           chain.displacement_lps_mm)
    assert np.median(np.linalg.norm(chain.displacement_lps_mm + back, axis=-1)[near]) < 0.2


def test_chain_field_reproduces_warped_through_itk(tmp_path, posed):
    source, _, _, _, chain, _, _ = posed
    out = check_itk_reproduces_warped(tmp_path, source, chain)
    # params.txt holds the three maps as run, and reads back as them
    assert elastix.read_parameter_maps(out / "params.txt") == chain.parameter_maps
    assert "elastix parameter map 3 of 3" in (out / "params.txt").read_text()
