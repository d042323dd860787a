"""The elastix baseline adapter: accuracy on a known shift, ITK agreement, CLI outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import Geometry, io
from combireg.errors import CombiregError

from tests.conftest import ROOT, image_from_world_function, itk_warp_with_field, oblique_direction, smooth_pattern

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


def test_elastix_failure_is_one_line_error(tmp_path, pair):
    src, tgt = pair
    bad = tmp_path / "unknown.txt"
    bad.write_text('(Transform "NoSuchTransform")\n(Metric "AdvancedMeanSquares")\n')
    with pytest.raises(CombiregError, match="elastix failed") as info:
        elastix.register_elastix(src[0], tgt[0], parameter_file=bad)
    assert "\n" not in str(info.value)
