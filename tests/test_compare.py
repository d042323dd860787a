"""`combireg compare` end to end on data_samples/, and the one field convention of every method."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from combireg.cli.main import main
from tests.conftest import ROOT, itk_warp_with_field

CASE = ROOT / "data_samples" / "case0000"
SRC = f"{CASE}/source_t1.nii.gz,{CASE}/source_t2.nii.gz"
TGT = f"{CASE}/target_t1.nii.gz,{CASE}/target_t2.nii.gz"
LANDMARKS = ["--target-landmarks", str(CASE / "target_landmarks.fcsv"),
             "--source-landmarks", str(CASE / "source_landmarks.fcsv")]
RUN_FILES = {"field.nii.gz", "field_inverse.nii.gz", "warped_0.nii.gz", "warped_1.nii.gz", "params.txt",
             "report.json"}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One compare run of combireg, elastix and SyN (each made fast) on the 2 mm sample case."""
    from combireg.adapters import elastix

    tmp = tmp_path_factory.mktemp("compare")
    params = tmp / "fast.txt"
    params.write_text("(NumberOfResolutions 2)\n(ImagePyramidSchedule 4 4 4 2 2 2)\n"
                      "(MaximumNumberOfIterations 60 20)\n")
    pm = elastix.default_parameter_map()
    pm.update(NumberOfResolutions=["2"], GridSpacingSchedule=["2", "1"], MaximumNumberOfIterations=["60"],
              FinalGridSpacingInPhysicalUnits=["12"])
    elastix_params = tmp / "elastix_fast.txt"
    elastix_params.write_text(elastix.format_elastix_map(pm))
    syn_params = tmp / "syn_fast.txt"
    syn_params.write_text("(ShrinkFactors 8 4)\n(MaximumNumberOfIterations 50 30)\n")
    out = tmp / "out"
    res = _invoke("compare", SRC, TGT, *LANDMARKS, "-o", out, "-p", params, "--elastix-params", elastix_params,
                  "--syn-params", syn_params, "-q")
    return res, out


def test_compare_writes_table_json_picture_and_every_methods_outputs(compared):
    res, out = compared
    assert res.exit_code == 0, res.output
    assert {"combireg", "elastix", "syn", "compare.md", "compare.json", "qc.png"} <= {p.name for p in out.iterdir()}
    payload = json.loads((out / "compare.json").read_text())
    methods = {m["method"]: m for m in payload["methods"]}
    assert list(methods) == ["combireg", "elastix", "syn"]
    initial = payload["initial"]["initial_mean"]
    assert initial > 2.0  # the sample pair is not aligned to begin with
    for name, m in methods.items():
        assert m["status"] == "ok", m
        assert RUN_FILES <= {p.name for p in (out / name).iterdir()}
        assert m["tre_mean"] < 0.7 * initial, name  # every method improves on the initial TRE
        assert 0 <= m["robustness"] <= 1 and m["time_s"] > 0 and m["peak_memory_mb"] > 0
        assert m["folding_percent"] < 1.0
        # the row's TRE is the one computed from the saved field
        tre = json.loads((out / name / "tre.json").read_text())
        assert tre["statistics"]["mean"] == pytest.approx(m["tre_mean"])
        assert f"| {name} |" in res.output and f"| {name} |" in (out / "compare.md").read_text()
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["combireg", "elastix", "syn"])
def test_every_method_writes_one_field_convention(compared, method):
    """ITK's own resampler, given a method's field.nii.gz, reproduces that method's warped image:
    target grid, LPS mm, target point x -> source point x + u(x), for run and both baselines."""
    from combireg import io

    _, out = compared
    ours, theirs = itk_warp_with_field(CASE / "source_t1.nii.gz", out / method)
    field, geometry = io.read_displacement(out / method / "field.nii.gz")
    target = io.read_image(CASE / "target_t1.nii.gz")
    assert geometry.same_grid(target.geometry) and field.shape == target.geometry.shape + (3,)
    # Compare where x + u(x) lies a voxel inside the source grid: at its edge ITK (outside ->
    # default value) and trilinear zero padding legitimately differ.
    source = io.read_image(CASE / "source_t1.nii.gz").geometry
    index = source.world_to_index((geometry.world_grid() + field).reshape(-1, 3)).reshape(field.shape)
    inside = np.all((index >= 1) & (index <= np.asarray(source.size) - 2), axis=-1)
    assert inside.mean() > 0.8
    assert np.abs(ours - theirs)[inside].max() < 1e-3 * np.abs(ours).max()


@pytest.mark.parametrize("args, message", [
    (["--target-landmarks", "missing.fcsv", "--source-landmarks", str(CASE / "source_landmarks.fcsv")], "no such file"),
    ([*LANDMARKS, "-m", "bogus"], "unknown method"),
    ([*LANDMARKS, "-m", "syn", "-m", "syn"], "given twice"),
])
def test_compare_bad_input_one_line_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compare", SRC, TGT, *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_compare_channel_mismatch(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compare", f"{CASE}/source_t1.nii.gz", TGT, *LANDMARKS, "-o", str(out)])
    assert res.exit_code == 2 and "same count" in res.output
    assert not out.exists()
