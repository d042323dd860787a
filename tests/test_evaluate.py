"""combireg.evaluate and `combireg evaluate`: manifests, method specs, statistics, end to end."""
import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from combireg.cli.main import main
from combireg.errors import CombiregError
from combireg.methods import SPEC_KEYS, parse_method
from combireg.summary import paired_t_test, parse_comparisons, read_results
from tests.conftest import ROOT

SAMPLES = ROOT / "data_samples"
TINY = "(NumberOfResolutions 1)\n(ImagePyramidSchedule 4 4 4)\n(MaximumNumberOfIterations 5)\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _params(folder, name, extra=""):
    path = folder / name
    path.write_text(TINY + extra)
    return path


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    mse = _params(folder, "mse.txt", '(Metric "MSE")\n')
    mixed = _params(folder, "mixed.txt", '(Metric "MSE" "NCC")\n(NCCWindowSize 5)\n')
    out = folder / "out"
    methods = ["--method", f"mse={mse}", "--method", f"mixed=params:{mixed}"]
    res = invoke("evaluate", SAMPLES / "manifest.csv", *methods, "--compare", "mixed:mse", "-o", out, "-q")
    return out, res, methods


def test_evaluate_end_to_end_on_data_samples(evaluated):
    out, res, _ = evaluated
    assert res.exit_code == 0, res.output
    assert "4 cell(s) run, 0 skipped" in res.output and "| mixed | mse | 2 |" in res.output
    rows = _csv_rows(out / "results.csv")
    assert [(r["case"], r["method"], r["status"]) for r in rows] == [
        ("case0000", "mse", "ok"), ("case0000", "mixed", "ok"), ("case0001", "mse", "ok"), ("case0001", "mixed", "ok")]
    for row in rows:
        case = json.loads((SAMPLES / row["case"] / "case.json").read_text())
        assert float(row["initial_mean"]) == pytest.approx(case["landmarks"]["initial_distance_mm"]["mean"], rel=1e-4)
        assert int(float(row["n_landmarks"])) == case["landmarks"]["total"]
        for key in ("tre_mean", "tre_median", "tre_p95", "tre_max", "robustness", "time_s", "peak_memory_mb",
                    "folding_percent"):
            assert math.isfinite(float(row[key])), key
        cell = out / row["outdir"]
        assert {"field.nii.gz", "field_inverse.nii.gz", "report.json", "tre.csv", "tre.json"} <= \
            {p.name for p in cell.iterdir()}
        assert json.loads((cell / "report.json").read_text())["tre"]["statistics"]["mean"] == \
            pytest.approx(float(row["tre_mean"]), rel=1e-5)
    summary = (out / "summary.md").read_text()
    assert "| Method | Cases | TRE mean ± std (mm) | TRE median (mm)" in summary
    for name in ("initial (identity)", "mse", "mixed"):
        assert f"| {name} | 2/2 |" in summary
    assert "## Paired t-tests" in summary and "| mixed | mse | 2 |" in summary
    assert (out / "tre_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_test_matches_scipy_on_the_results(evaluated):
    out, _, _ = evaluated
    rows = read_results(out / "results.csv")
    a = [rows[(c, "mixed")]["tre_mean"] for c in ("case0000", "case0001")]
    b = [rows[(c, "mse")]["tre_mean"] for c in ("case0000", "case0001")]
    (test,) = _csv_rows(out / "ttests.csv")
    assert (test["a"], test["b"], test["n"]) == ("mixed", "mse", "2")
    assert float(test["p_value"]) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-4)
    d = np.subtract(a, b)
    assert float(test["mean_difference"]) == pytest.approx(d.mean(), rel=1e-4)
    assert float(test["ci_low"]) < d.mean() < float(test["ci_high"])


def test_tre_command_reproduces_a_results_row(evaluated, tmp_path):
    out, _, _ = evaluated
    row = read_results(out / "results.csv")[("case0001", "mixed")]
    res = invoke("tre", out / row["outdir"] / "field.nii.gz", SAMPLES / "case0001/target_landmarks.fcsv",
                 SAMPLES / "case0001/source_landmarks.fcsv", "--json", tmp_path / "t.json", "-q")
    assert res.exit_code == 0, res.output
    stats_ = json.loads((tmp_path / "t.json").read_text())["statistics"]
    assert stats_["mean"] == pytest.approx(row["tre_mean"], rel=1e-5)
    assert stats_["robustness"] == pytest.approx(row["robustness"], rel=1e-5)


def test_rerun_skips_finished_cells_and_refuses_a_changed_spec(evaluated):
    out, _, methods = evaluated
    before = (out / "results.csv").read_text()
    res = invoke("evaluate", SAMPLES / "manifest.csv", *methods, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert "0 cell(s) run, 4 skipped" in res.output
    assert (out / "results.csv").read_text() == before
    other = CliRunner().invoke(main, ["evaluate", str(SAMPLES / "manifest.csv"), "--method",
                                      f"mse={methods[3].split(':', 1)[1]}", "-o", str(out)])
    assert other.exit_code == 2 and "finished earlier as" in other.output
    assert (out / "results.csv").read_text() == before


def test_a_case_with_a_missing_file_fails_and_the_rest_run(tmp_path):
    params = _params(tmp_path, "tiny.txt")
    c0, c1 = SAMPLES / "case0000", SAMPLES / "case0001"

    def manifest(second_target):
        text = "id,source,target,target_landmarks,source_landmarks\n"
        for cid, case, tgt in (("good", c0, c0 / "target_t1.nii.gz"), ("broken", c1, second_target)):
            text += (f'{cid},"{case}/source_t1.nii.gz,{case}/source_t2.nii.gz","{tgt},{case}/target_t2.nii.gz",'
                     f"{case}/target_landmarks.fcsv,{case}/source_landmarks.fcsv\n")
        (tmp_path / "manifest.csv").write_text(text)

    manifest(tmp_path / "nowhere" / "target_t1.nii.gz")
    out = tmp_path / "out"
    res = invoke("evaluate", tmp_path / "manifest.csv", "--method", f"tiny={params}", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    rows = read_results(out / "results.csv")
    assert rows[("good", "tiny")]["status"] == "ok"
    assert rows[("broken", "tiny")]["status"] == "failed"
    assert "missing file" in rows[("broken", "tiny")]["error"] and "nowhere" in rows[("broken", "tiny")]["error"]
    assert "1 failed" in res.output and "broken / tiny" in (out / "summary.md").read_text()
    assert "| tiny | 1/2 |" in (out / "summary.md").read_text()
    assert not (out / "cases" / "broken").exists()
    # fixed: the rerun runs only the failed cell
    manifest(c1 / "target_t1.nii.gz")
    res = invoke("evaluate", tmp_path / "manifest.csv", "--method", f"tiny={params}", "-o", out, "-q")
    assert "1 cell(s) run, 1 skipped" in res.output
    rows = read_results(out / "results.csv")
    assert rows[("broken", "tiny")]["status"] == "ok"
    assert len(_csv_rows(out / "results.csv")) == 2  # compacted: one row per cell


# ------------------------------------------------------------------------------ specs
def test_method_spec_grammar(tmp_path):
    params = _params(tmp_path, "p.txt")
    plain = parse_method(f"a={params}")
    assert (plain.name, plain.params, plain.init) == ("a", params, None)
    assert plain.settings.iterations == (5,)
    full = parse_method(f"b=params:{params},init:runs/{{case}}/a/field.nii.gz")
    assert full.params == params and str(full.init_for("case7")) == "runs/case7/a/field.nii.gz"
    bare_init = parse_method(f"c={params},init:f.nii.gz")
    assert bare_init.init == "f.nii.gz"
    defaults = parse_method("d=init:f.nii.gz")
    assert defaults.params is None and defaults.settings.source == "<defaults>"
    assert {"params", "init", "baseline", "drn"} <= set(SPEC_KEYS)


@pytest.mark.parametrize("spec,message", [
    ("noequals", "expected NAME=SPEC"),
    ("=p.txt", "expected NAME=SPEC"),
    ("a/b=PARAMS", "NAME must be"),
    ("a=baseline:bspline", "is not available"),
    ("a=baseline:syn,params:PARAMS", "unknown SyN key"),
    ("a=baseline:elastix,init:x.nii.gz", "takes no 'init:'"),
    ("a=drn:model.pt", "no such DRN model file"),
    ("a=PARAMS,drn:MODEL,init:x.nii.gz", "not both"),
    ("a=PARAMS,foo:bar", "unknown item"),
    ("a=PARAMS,,init:x", "empty item"),
    ("a=params:PARAMS,params:PARAMS", "given twice"),
    ("a=init:", "needs a value"),
    ("a=missing.txt", "no such file"),
    ("a=BADPARAMS", "Bogus"),
])
def test_method_spec_errors(tmp_path, spec, message):
    params = _params(tmp_path, "p.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("(Bogus 1)\n")
    spec = spec.replace("BADPARAMS", str(bad)).replace("PARAMS", str(params))
    if "MODEL" in spec:
        spec = spec.replace("MODEL", str(_tiny_model(tmp_path)))
    with pytest.raises(CombiregError, match=message):
        parse_method(spec)


def _tiny_model(tmp_path, channels=2):
    from combireg.network import DrnModel, RegistrationUNet, save_model

    path = tmp_path / "tiny.pt"
    save_model(DrnModel(RegistrationUNet(channels=channels, features=(4, 8)), internal_shape=(12, 14, 12)), path)
    return path


def test_drn_methods_run_like_any_method(tmp_path):
    """drn:MODEL with 0 iterations is the DRN alone; with iterations, DRN + IO."""
    model = _tiny_model(tmp_path)
    io_only = tmp_path / "io.txt"
    # No rigid step before the network: its (untrained) field alone is what the test reads.
    io_only.write_text("(NumberOfResolutions 1)\n(ImagePyramidSchedule 4 4 4)\n(MaximumNumberOfIterations 20)\n"
                       "(PreAlignment \"none\")\n")
    drn_only = tmp_path / "drn.txt"
    drn_only.write_text("(NumberOfResolutions 1)\n(ImagePyramidSchedule 4 4 4)\n(MaximumNumberOfIterations 0)\n"
                        "(PreAlignment \"none\")\n")
    out = tmp_path / "ev"
    res = invoke("evaluate", SAMPLES / "manifest.csv", "-m", f"drn={drn_only},drn:{model}",
                 "-m", f"drn_io={io_only},drn:{model}", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    rows = {(r["case"], r["method"]): r for r in _csv_rows(out / "results.csv")}
    assert all(r["status"] == "ok" for r in rows.values())
    for case in ("case0000", "case0001"):
        # an untrained net predicts (almost) the identity; IO after it improves on it
        drn, drn_io = rows[(case, "drn")], rows[(case, "drn_io")]
        assert float(drn["tre_mean"]) == pytest.approx(float(drn["initial_mean"]), abs=0.05)
        assert float(drn_io["tre_mean"]) < 0.8 * float(drn_io["initial_mean"])
        report = json.loads((out / drn_io["outdir"] / "report.json").read_text())
        assert report["init"]["kind"] == "drn" and report["init"]["model"].endswith("tiny.pt")


def test_comparisons(tmp_path):
    params = _params(tmp_path, "p.txt")
    methods = [parse_method(f"{n}={params}") for n in ("a", "b", "c")]
    assert parse_comparisons([], methods) == [("a", "b"), ("a", "c")]
    assert parse_comparisons(["c:b"], methods) == [("c", "b")]
    for bad, message in (("a", "expected A:B"), ("a:z", "unknown method 'z'"), ("a:a", "two different")):
        with pytest.raises(CombiregError, match=message):
            parse_comparisons([bad], methods)


def test_paired_t_test_numbers():
    a, b = np.array([3.0, 4.5, 2.0, 5.0]), np.array([2.5, 4.0, 2.2, 4.1])
    res = paired_t_test(a, b)
    d = a - b
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    assert res["mean_difference"] == pytest.approx(d.mean())
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert res["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert math.isnan(paired_t_test([1.0], [2.0])["p_value"])
    same = paired_t_test([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(same["p_value"]) and same["ci_low"] == same["ci_high"] == 0.0


# ------------------------------------------------------------------------------ command errors
@pytest.mark.parametrize("args,message", [
    (["MISSING", "--method", "a=PARAMS"], "no such manifest"),
    (["MANIFEST", "--method", "a=PARAMS", "--compare", "a:b"], "unknown method 'b'"),
    (["MANIFEST", "--method", "a=PARAMS", "--method", "a=PARAMS"], "given twice"),
    (["MANIFEST", "--method", "a=baseline:bspline"], "is not available"),
    (["MANIFEST", "--method", "a=PARAMS", "--landmark-space", "voxel"], "voxel"),
    (["MANIFEST", "--method", "a=PARAMS", "--scheduler", "tcp://127.0.0.1:1"], "cannot reach the dask scheduler"),
    (["MANIFEST", "--method", "a=PARAMS", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "one or the other"),
    (["MANIFEST", "--method", "a=PARAMS", "--device", "tpu"], "--device 'tpu'"),
])
def test_evaluate_command_errors_write_nothing(tmp_path, args, message):
    params = _params(tmp_path, "p.txt")
    args = [str(SAMPLES / "manifest.csv") if a == "MANIFEST" else str(tmp_path / "missing.csv") if a == "MISSING"
            else a.replace("PARAMS", str(params)) for a in args]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["evaluate", *args, "-o", str(out)])
    assert res.exit_code == 2 and message in res.output
    assert not out.exists()


def test_evaluate_refuses_a_foreign_non_empty_folder(tmp_path):
    params = _params(tmp_path, "p.txt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    res = CliRunner().invoke(main, ["evaluate", str(SAMPLES / "manifest.csv"), "--method", f"a={params}",
                                    "-o", str(out)])
    assert res.exit_code == 2 and "holds no results.csv" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_evaluate_runs_the_elastix_baseline_like_any_method(tmp_path):
    """baseline:elastix cells produce the same outputs and rows as combireg cells."""
    from combireg.adapters import elastix

    pm = elastix.default_parameter_map()
    pm.update(NumberOfResolutions=["1"], GridSpacingSchedule=["1"], MaximumNumberOfIterations=["30"],
              FinalGridSpacingInPhysicalUnits=["32"])
    fast = tmp_path / "fast_elastix.txt"
    fast.write_text(elastix.format_elastix_map(pm))
    out = tmp_path / "ev"
    res = invoke("evaluate", SAMPLES / "manifest.csv", "-m", f"bl=baseline:elastix,params:{fast}", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    rows = _csv_rows(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        assert float(row["tre_mean"]) < float(row["initial_mean"])
        cell = out / row["outdir"]
        assert {"field.nii.gz", "field_inverse.nii.gz", "warped_0.nii.gz", "warped_1.nii.gz", "params.txt",
                "report.json", "tre.csv", "tre.json"} <= {p.name for p in cell.iterdir()}


def test_ants_baseline_without_antspyx_fails_up_front():
    import importlib.util

    if importlib.util.find_spec("ants") is not None:
        pytest.skip("antspyx is installed here")
    with pytest.raises(CombiregError, match="antspyx"):
        parse_method("a=baseline:ants")


# ------------------------------------------------------------------------------ near the lesion
def test_lesion_distances_are_world_distances_on_an_oblique_grid():
    import torch

    from combireg import Geometry, Image
    from combireg.evaluate import lesion_distances

    angle = np.deg2rad(25.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    geometry = Geometry((30, 24, 20), origin=(-10.0, 5.0, 2.0), spacing=(1.5, 2.0, 2.5), direction=direction)
    mask = np.zeros(geometry.shape, dtype=np.float32)
    mask[8:11, 10:13, 12:16] = 1  # a small block (z, y, x)
    lesion = Image(torch.from_numpy(mask)[None], geometry)
    zyx = np.argwhere(mask > 0)
    lesion_world = geometry.index_to_world(zyx[:, ::-1].astype(np.float64))
    rng = np.random.default_rng(3)
    index = rng.uniform(0, np.asarray(geometry.size) - 1, size=(40, 3))
    true = lambda pts: np.min(np.linalg.norm(pts[:, None] - lesion_world[None], axis=2), axis=1)  # noqa: E731
    # at voxel centres the distance is exact (0 inside the lesion)
    centres = geometry.index_to_world(np.rint(index))
    np.testing.assert_allclose(lesion_distances(centres, lesion), true(centres), atol=1e-9)
    assert (lesion_distances(lesion_world, lesion) == 0).all()
    # elsewhere it is measured from the nearest voxel's nearest lesion voxel: within half a voxel diagonal
    points = geometry.index_to_world(index)
    half_diagonal = 0.5 * np.linalg.norm(geometry.spacing)
    assert np.all(np.abs(lesion_distances(points, lesion) - true(points)) <= half_diagonal + 1e-9)
    with pytest.raises(CombiregError, match="empty"):
        lesion_distances(points, Image(torch.zeros((1,) + geometry.shape), geometry))


def test_evaluate_reports_tre_near_the_lesion(tmp_path):
    from combireg import io
    from combireg.landmarks import read_landmarks

    case = SAMPLES / "case0000"
    target = io.read_image(case / "target_t1.nii.gz")
    # a lesion mask around the first target landmark: that landmark is near, far ones are not
    first = read_landmarks(case / "target_landmarks.fcsv").points_lps_mm[0]
    world = target.geometry.world_grid().reshape(-1, 3)
    ball = (np.linalg.norm(world - first, axis=1) <= 6.0).reshape(target.geometry.shape)
    io.write_image(tmp_path / "lesion.nii.gz", ball.astype(np.uint8), target.geometry, dtype=np.uint8)
    text = "id,source,target,target_landmarks,source_landmarks,lesion\n"
    text += (f'c0,"{case}/source_t1.nii.gz,{case}/source_t2.nii.gz","{case}/target_t1.nii.gz,{case}/target_t2.nii.gz",'
             f"{case}/target_landmarks.fcsv,{case}/source_landmarks.fcsv,{tmp_path / 'lesion.nii.gz'}\n")
    (tmp_path / "manifest.csv").write_text(text)
    params = _params(tmp_path, "tiny.txt")
    out = tmp_path / "out"
    res = invoke("evaluate", tmp_path / "manifest.csv", "--method", f"tiny={params}", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    row = read_results(out / "results.csv")[("c0", "tiny")]
    tre = json.loads((out / "cases" / "c0" / "tiny" / "tre.json").read_text())
    landmarks = read_landmarks(case / "target_landmarks.fcsv").points_lps_mm
    near = np.linalg.norm(landmarks - first, axis=1) <= 6.0 + 20.0 + 1.0  # ball + 20 mm, + a voxel's slack
    assert 1 <= row["n_near_lesion"] <= near.sum()
    errors = np.array([r["error_mm"] for r in tre["landmarks"]])
    assert row["n_near_lesion"] < len(errors)
    assert errors.min() - 1e-6 <= row["tre_near_lesion_mean"] <= errors.max() + 1e-6
    summary = (out / "summary.md").read_text()
    assert "TRE within 20 mm of the lesion" in summary
    assert f"| {int(row['n_near_lesion'])} |" in summary


def test_mask_exclude_lesion_masks_the_lesion_out_of_the_similarity(tmp_path, monkeypatch):
    from combireg import api, io
    from combireg.cases import read_manifest
    from combireg.evaluate import run_cell
    from combireg.methods import parse_method

    case_dir = SAMPLES / "case0000"
    target = io.read_image(case_dir / "target_t1.nii.gz")
    ball = np.zeros(target.geometry.shape, dtype=np.uint8)
    ball[10:20, 12:22, 8:18] = 1
    io.write_image(tmp_path / "lesion.nii.gz", ball, target.geometry, dtype=np.uint8)
    text = "id,source,target,target_landmarks,source_landmarks,lesion\n"
    text += (f"c0,{case_dir}/source_t1.nii.gz,{case_dir}/target_t1.nii.gz,{case_dir}/target_landmarks.fcsv,"
             f"{case_dir}/source_landmarks.fcsv,{tmp_path / 'lesion.nii.gz'}\n")
    (tmp_path / "manifest.csv").write_text(text)
    case = read_manifest(tmp_path / "manifest.csv")[0]
    seen = {}
    real = api.register

    def spy(*args, target_mask=None, **kwargs):
        seen["mask"] = target_mask
        return real(*args, target_mask=target_mask, **kwargs)

    monkeypatch.setattr(api, "register", spy)
    params = _params(tmp_path, "tiny.txt")
    row = run_cell(case, parse_method(f"masked={params},mask:exclude-lesion"), tmp_path / "out")
    assert row["status"] == "ok"
    mask = seen["mask"].numpy()[0]
    np.testing.assert_array_equal(mask, 1.0 - ball)  # the lesion is out, everything else counts
    with pytest.raises(CombiregError, match="mask:exclude-lesion"):
        parse_method(f"bad={params},mask:lesion")
    with pytest.raises(CombiregError, match="takes no"):
        parse_method("base=baseline:elastix,mask:exclude-lesion")


# ------------------------------------------------------------------------------ datasets as downloaded
# Deformable steps alone (no rigid pre-alignment): the toy layouts' shifts are what they must recover.
SHORT = '(NumberOfResolutions 1)\n(ImagePyramidSchedule 2 2 2)\n(Metric "MSE")\n(MaximumNumberOfIterations 5)\n(PreAlignment "none")\n'
LONG = ('(NumberOfResolutions 2)\n(ImagePyramidSchedule 4 4 4 2 2 2)\n(Metric "MSE")\n(MaximumNumberOfIterations 30 15)\n'
        '(PreAlignment "none")\n')


def _two_methods(folder):
    (folder / "short.txt").write_text(SHORT)
    (folder / "long.txt").write_text(LONG)
    return ["-m", f"short={folder / 'short.txt'}", "-m", f"long={folder / 'long.txt'}"]


def test_evaluate_a_brats_reg_folder_end_to_end(tmp_path):
    """Baseline = target, follow-up = source, four sequences as channels; TRE table and t-test."""
    from tests.datasets import make_brats_reg

    shifts = {"BraTSReg_001": (3.0, -2.5, 1.5), "BraTSReg_002": (0.0, 3.5, -1.0)}
    make_brats_reg(tmp_path / "BraTSReg_Training_Data_v3", shifts)
    out = tmp_path / "out"
    res = invoke("evaluate", tmp_path / "BraTSReg_Training_Data_v3", *_two_methods(tmp_path), "-o", out, "-q")
    assert res.exit_code == 0, res.output
    rows = read_results(out / "results.csv")
    for cid, shift in shifts.items():
        for method in ("short", "long"):
            row = rows[(cid, method)]
            assert row["status"] == "ok" and row["n_landmarks"] == 4
            assert row["initial_mean"] == pytest.approx(np.linalg.norm(shift), abs=1e-3)
            assert row["dice_mean"] == ""  # no label maps: no Dice
        assert rows[(cid, "long")]["tre_mean"] < rows[(cid, "long")]["initial_mean"]
        report = json.loads((out / rows[(cid, "long")]["outdir"] / "report.json").read_text())
        assert report["target"]["channels"] == 4
    summary = (out / "summary.md").read_text()
    assert "## TRE per method" in summary and "## Dice per method" not in summary
    assert "| TRE | short | long | 2 |" in summary
    assert [t["metric"] for t in _csv_rows(out / "ttests.csv")] == ["tre"]
    assert (out / "tre_boxplot.png").is_file() and not (out / "dice_boxplot.png").exists()


def test_evaluate_a_learn2reg_json_end_to_end(tmp_path):
    """registration_val pairs; Dice and HD95 where labels exist, TRE where keypoints exist; the
    Dice of a cell equals an independent `combireg apply --labels` + Dice from the saved field."""
    from combireg import io
    from combireg.overlap import dice
    from tests.datasets import make_learn2reg

    shifts = {"0001": (3.0, -2.5, 1.5), "0002": (0.0, 3.5, -1.0)}
    json_path = make_learn2reg(tmp_path / "TOY", shifts, keypoints_for=("0001",))
    out = tmp_path / "out"
    res = invoke("evaluate", json_path, *_two_methods(tmp_path), "-o", out, "-q", "--compare", "long:short")
    assert res.exit_code == 0, res.output
    rows = read_results(out / "results.csv")
    with_kp, labels_only = rows[("0001_0000-0001_0001", "long")], rows[("0002_0000-0002_0001", "long")]
    assert with_kp["n_landmarks"] == 4 and with_kp["initial_mean"] == pytest.approx(np.linalg.norm(shifts["0001"]), abs=1e-3)
    assert labels_only["tre_mean"] == "" and labels_only["n_landmarks"] == ""
    for row in (with_kp, labels_only):
        assert row["n_labels"] == 3 and 0.0 < row["initial_dice_mean"] < row["dice_mean"] <= 1.0
        assert row["hd95_mean"] < row["initial_hd95_mean"]
        per_label = _csv_rows(out / row["outdir"] / "dice.csv")
        assert [r["label"] for r in per_label] == ["1", "4", "9"]
        assert np.mean([float(r["dice"]) for r in per_label]) == pytest.approx(row["dice_mean"], rel=1e-5)
    case = "0002_0000-0002_0001"
    warped = tmp_path / "warped_labels.nii.gz"
    again = invoke("apply", out / rows[(case, "long")]["outdir"] / "field.nii.gz",
                   tmp_path / "TOY/labelsTr/TOY_0002_0001.nii.gz", "-o", warped, "--labels")
    assert again.exit_code == 0, again.output
    target_labels, _ = io.read_array(tmp_path / "TOY/labelsTr/TOY_0002_0000.nii.gz")
    moved, _ = io.read_array(warped)
    independent = np.mean([dice(target_labels == k, moved == k) for k in (1, 4, 9)])
    assert independent == pytest.approx(rows[(case, "long")]["dice_mean"], rel=1e-6)
    summary = (out / "summary.md").read_text()
    assert "## TRE per method" in summary and "## Dice per method" in summary
    assert "| long | 2/2 |" in summary and "| long | 1/2 |" in summary  # Dice for 2 cases, TRE for 1
    tests = {(t["metric"], t["a"], t["b"]): t for t in _csv_rows(out / "ttests.csv")}
    assert set(tests) == {("tre", "long", "short"), ("dice", "long", "short")}
    assert tests[("dice", "long", "short")]["n"] == "2" and tests[("tre", "long", "short")]["n"] == "1"
    a = [rows[(c, "long")]["dice_mean"] for c in ("0001_0000-0001_0001", "0002_0000-0002_0001")]
    b = [rows[(c, "short")]["dice_mean"] for c in ("0001_0000-0001_0001", "0002_0000-0002_0001")]
    assert float(tests[("dice", "long", "short")]["mean_difference"]) == pytest.approx(np.mean(np.subtract(a, b)),
                                                                                  rel=1e-4)
    np.testing.assert_allclose(float(tests[("dice", "long", "short")]["p_value"] or "nan"),
                               stats.ttest_rel(a, b).pvalue, rtol=1e-4, equal_nan=True)
    assert (out / "dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_without_landmarks_or_labels_fails_nothing(tmp_path):
    case = SAMPLES / "case0000"
    (tmp_path / "m.csv").write_text(f"id,source,target\nc0,{case}/source_t1.nii.gz,{case}/target_t1.nii.gz\n")
    out = tmp_path / "out"
    res = invoke("evaluate", tmp_path / "m.csv", "-m", f"tiny={_params(tmp_path, 'tiny.txt')}", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    row = read_results(out / "results.csv")[("c0", "tiny")]
    assert row["status"] == "ok" and row["tre_mean"] == "" and row["dice_mean"] == ""
    assert "no TRE or Dice to report" in (out / "summary.md").read_text()
    assert not (out / "cases" / "c0" / "tiny" / "tre.csv").exists()
