"""combireg.landmarks and `combireg tre`: file formats, spaces, matching, TRE, bad input."""
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import Geometry, io
from combireg.cli.main import main
from combireg.errors import CombiregError
from combireg.landmarks import (
    Landmarks,
    compute_tre,
    match_landmarks,
    read_landmarks,
    tre_from_files,
    tre_statistics,
    write_landmarks,
)
from tests.conftest import ROOT, known_displacement

CASE = ROOT / "data_samples" / "case0000"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def interior_points(geometry: Geometry, n: int, seed: int = 0, margin: float = 3.0) -> np.ndarray:
    """Random world points well inside ``geometry`` (continuous indices at least ``margin`` in)."""
    rng = np.random.default_rng(seed)
    upper = np.asarray(geometry.size, dtype=float) - 1 - margin
    return geometry.index_to_world(rng.uniform(margin, upper, size=(n, 3)))


@pytest.fixture
def labelled(oblique_geometry):
    pts = interior_points(oblique_geometry, 7)
    return Landmarks(pts, [f"P{i}" for i in range(7)])


# ------------------------------------------------------------------------------ TRE
def test_tre_of_identity_equals_direct_distances():
    rng = np.random.default_rng(1)
    t = rng.normal(scale=20, size=(12, 3))
    s = t + rng.normal(scale=3, size=(12, 3))
    res = compute_tre(None, None, Landmarks(t, [f"L{i}" for i in range(12)]), Landmarks(s, [f"L{i}" for i in range(12)]))
    direct = np.sqrt(((t - s) ** 2).sum(axis=1))
    np.testing.assert_allclose(res.errors_mm, direct, rtol=1e-12)
    np.testing.assert_allclose(res.initial_errors_mm, direct, rtol=1e-12)
    st = res.statistics
    assert st["mean"] == pytest.approx(direct.mean()) and st["median"] == pytest.approx(np.median(direct))
    assert st["max"] == pytest.approx(direct.max()) and st["p95"] == pytest.approx(np.percentile(direct, 95))
    assert st["std"] == pytest.approx(direct.std()) and st["robustness"] == 0.0


def test_translation_field_gives_zero_tre_on_oblique_anisotropic_grid(tmp_path, oblique_geometry, labelled):
    shift = np.array([3.2, -1.7, 2.5])
    field = np.broadcast_to(shift, oblique_geometry.shape + (3,)).astype(np.float32)
    io.write_displacement(tmp_path / "field.nii.gz", field, oblique_geometry)
    source = Landmarks(labelled.points_lps_mm + shift, labelled.labels)
    write_landmarks(tmp_path / "t.fcsv", labelled)
    write_landmarks(tmp_path / "s.mrk.json", source, space="ras")
    res = tre_from_files(tmp_path / "field.nii.gz", tmp_path / "t.fcsv", tmp_path / "s.mrk.json")
    assert res.statistics["max"] < 1e-4
    np.testing.assert_allclose(res.initial_errors_mm, np.linalg.norm(shift), rtol=1e-6)
    assert res.statistics["robustness"] == 1.0


def test_smooth_field_is_exact_at_voxel_centres(oblique_geometry):
    u = known_displacement(oblique_geometry)
    rng = np.random.default_rng(3)
    idx = np.stack([rng.integers(1, n - 1, 10) for n in oblique_geometry.size], axis=1)
    x = oblique_geometry.index_to_world(idx)
    s = x + u[idx[:, 2], idx[:, 1], idx[:, 0]]
    res = compute_tre(u, oblique_geometry, Landmarks(x), Landmarks(s))
    assert res.errors_mm.max() < 1e-5


def test_robustness_on_a_constructed_case(oblique_geometry):
    t = interior_points(oblique_geometry, 4, seed=5)
    shift = np.array([2.0, 0.0, 0.0])
    field = np.broadcast_to(shift, oblique_geometry.shape + (3,)).astype(np.float32)
    offsets = np.array([[2.0, 0, 0],    # initial 2, after 0: improved
                        [1.0, 0, 0],    # initial 1, after 1: unchanged, not improved
                        [-2.0, 0, 0],   # initial 2, after 4: worse
                        [3.0, 0, 0]])   # initial 3, after 1: improved
    res = compute_tre(field, oblique_geometry, Landmarks(t, list("abcd")), Landmarks(t + offsets, list("abcd")))
    np.testing.assert_allclose(res.initial_errors_mm, [2, 1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(res.errors_mm, [0, 1, 4, 1], atol=1e-5)
    assert res.statistics["robustness"] == 0.5
    assert [r["improved"] for r in res.rows()] == [True, False, False, True]


def test_statistics_keep_their_old_keys():
    st = tre_statistics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert {"n", "mean", "std", "median", "p95", "max", "initial_mean", "initial_median", "robustness"} <= set(st)
    assert st["robustness"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ spaces
def _itk_index_to_world(reference_path, index):
    import itk

    img = itk.imread(str(reference_path))
    out = []
    for i in index:
        ci = itk.ContinuousIndex[itk.D, 3]()
        for a in range(3):
            ci.SetElement(a, float(i[a]))
        out.append(list(img.TransformContinuousIndexToPhysicalPoint(ci)))
    return np.array(out)


def test_ras_lps_and_index_readers_agree(tmp_path, oblique_geometry, labelled, caplog):
    ref = tmp_path / "ref.nii.gz"
    io.write_image(ref, np.zeros(oblique_geometry.shape, np.float32), oblique_geometry)
    lps = labelled.points_lps_mm
    ras = lps * np.array([-1.0, -1.0, 1.0])
    index = oblique_geometry.world_to_index(lps)
    np.testing.assert_allclose(_itk_index_to_world(ref, index), lps, atol=1e-4)  # ITK agrees on the indices
    names = labelled.labels

    def fcsv(system, pts, header=True):
        lines = ["# Markups fiducial file version = 4.6"] + ([f"# CoordinateSystem = {system}"] if header else [])
        lines += [f"n{i},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,{lb},," for i, (p, lb) in enumerate(zip(pts, names))]
        return "\n".join(lines) + "\n"

    def mrk(system, pts):
        cps = [{"label": lb, "position": list(map(float, p))} for p, lb in zip(pts, names)]
        m = {"type": "Fiducial", "controlPoints": cps} | ({"coordinateSystem": system} if system else {})
        return json.dumps({"markups": [m]})

    def table(header, pts):
        return header + "\n" + "".join(f"{lb},{p[0]},{p[1]},{p[2]}\n" for p, lb in zip(pts, names))

    files = {
        "lps.fcsv": (fcsv("LPS", lps), {}), "one.fcsv": (fcsv("1", lps), {}),
        "ras.fcsv": (fcsv("RAS", ras), {}), "zero.fcsv": (fcsv("0", ras), {}),
        "nohdr.fcsv": (fcsv(None, ras, header=False), {}),
        "lps.mrk.json": (mrk("LPS", lps), {}), "ras.mrk.json": (mrk("RAS", ras), {}),
        "default.mrk.json": (mrk(None, lps), {}),
        "brats.csv": (table("Landmark,X,Y,Z", lps), {}),
        "generic_ras.csv": (table("name,x,y,z", ras), {"space": "ras"}),
        "generic_index.csv": (table("label,X,Y,Z", index), {"space": "index", "reference": ref}),
        "slicer_ras.csv": (table("label,r,a,s", ras), {}),
        "slicer_lps.csv": (table("label,l,p,s", lps), {}),
        "ijk.csv": (table("label,i,j,k", index), {"reference": oblique_geometry}),
        "elastix_point.txt": ("point\n7\n" + "".join(f"{p[0]} {p[1]} {p[2]}\n" for p in lps), {}),
        "elastix_index.pts": ("index\n7\n" + "".join(f"{p[0]} {p[1]} {p[2]}\n" for p in index), {"reference": ref}),
    }
    for name, (text, kwargs) in files.items():
        (tmp_path / name).write_text(text)
        with caplog.at_level(logging.WARNING, logger="combireg.landmarks"):
            caplog.clear()
            lm = read_landmarks(tmp_path / name, **kwargs)
        np.testing.assert_allclose(lm.points_lps_mm, lps, atol=1e-4, err_msg=name)
        if name.startswith("elastix"):
            assert not lm.labelled and lm.labels == [str(i + 1) for i in range(7)]
        else:
            assert lm.labelled and lm.labels == names, name
        warned = any("RAS" in r.getMessage() for r in caplog.records)
        assert warned == (name == "nohdr.fcsv"), name
        assert not any("no landmark space" in r.getMessage() for r in caplog.records) or name != "brats.csv"


def test_brats_reg_csv_is_itk_physical_space(tmp_path):
    # BraTS-Reg images: 240 x 240 x 155, 1 mm, ITK origin (0, -239, 0), identity direction, so the
    # files' X,Y,Z = (i, j - 239, k) are physical LPS points, not indices.
    brats = Geometry((240, 240, 155), origin=(0.0, -239.0, 0.0))
    rows = [(1, 116.53378, -120.56052, 85.06982), (2, 113.8363, -137.07277, 72.38724)]
    (tmp_path / "lm.csv").write_text("Landmark,X,Y,Z\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]}\n" for r in rows))
    (tmp_path / "idx.csv").write_text("Landmark,X,Y,Z\n" + "".join(f"{r[0]},{r[1]},{r[2] + 239},{r[3]}\n" for r in rows))
    phys = read_landmarks(tmp_path / "lm.csv", reference=brats)
    as_index = read_landmarks(tmp_path / "idx.csv", space="index", reference=brats)
    np.testing.assert_allclose(phys.points_lps_mm, as_index.points_lps_mm, atol=1e-9)
    assert phys.labels == ["1", "2"] and phys.labelled
    assert brats.contains_index(brats.world_to_index(phys.points_lps_mm)).all()


def test_transformix_output_points_are_read(tmp_path):
    text = ("Point\t0\t; InputIndex = [ 1 2 3 ]\t; InputPoint = [ 1.0 2.0 3.0 ]\t; OutputIndexFixed = [ 1 2 3 ]\t"
            "; OutputPoint = [ 1.5 -2.25 3.0 ]\t; Deformation = [ 0.5 -4.25 0.0 ]\n"
            "Point\t1\t; InputIndex = [ 0 0 0 ]\t; InputPoint = [ 0 0 0 ]\t; OutputIndexFixed = [ 0 0 0 ]\t"
            "; OutputPoint = [ 7 8 9 ]\t; Deformation = [ 7 8 9 ]\n")
    (tmp_path / "outputpoints.txt").write_text(text)
    lm = read_landmarks(tmp_path / "outputpoints.txt")
    np.testing.assert_allclose(lm.points_lps_mm, [[1.5, -2.25, 3.0], [7, 8, 9]])


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name,kwargs,keeps_labels", [
    ("a.fcsv", {}, True), ("a.fcsv", {"space": "ras"}, True),
    ("a.mrk.json", {}, True), ("a.mrk.json", {"space": "ras"}, True),
    ("a.csv", {}, True), ("a.csv", {"space": "ras"}, True), ("a.csv", {"space": "index", "ref": True}, True),
    ("a.txt", {}, False), ("a.pts", {"space": "index", "ref": True}, False),
])
def test_round_trips(tmp_path, oblique_geometry, labelled, name, kwargs, keeps_labels):
    kwargs = dict(kwargs)
    reference = oblique_geometry if kwargs.pop("ref", False) else None
    path = tmp_path / name
    write_landmarks(path, labelled, reference=reference, **kwargs)
    back = read_landmarks(path, reference=reference, **({"space": kwargs["space"]} if name.endswith(".csv") and
                                                        "space" in kwargs else {}))
    np.testing.assert_allclose(back.points_lps_mm, labelled.points_lps_mm, atol=1e-5)
    assert back.labelled == keeps_labels
    if keeps_labels:
        assert back.labels == labelled.labels


def test_unlabelled_round_trip_stays_unlabelled(tmp_path):
    lm = Landmarks(np.arange(12.0).reshape(4, 3))
    write_landmarks(tmp_path / "u.fcsv", lm)
    back = read_landmarks(tmp_path / "u.fcsv")
    assert not back.labelled and back.labels == ["1", "2", "3", "4"]


# ------------------------------------------------------------------------------ matching
def test_matching_by_label_reorders_the_source(labelled):
    order = np.random.default_rng(0).permutation(len(labelled))
    shuffled = Landmarks(labelled.points_lps_mm[order] + 1.0, [labelled.labels[i] for i in order])
    t, s, labels = match_landmarks(labelled, shuffled)
    assert labels == labelled.labels
    np.testing.assert_allclose(s, labelled.points_lps_mm + 1.0)


def test_matching_by_order_warns(labelled, caplog):
    unlabelled = Landmarks(labelled.points_lps_mm)
    with caplog.at_level(logging.WARNING, logger="combireg.landmarks"):
        _, _, labels = match_landmarks(labelled, unlabelled)
    assert "by order" in caplog.text and labels == labelled.labels


@pytest.mark.parametrize("target,source,message", [
    (Landmarks(np.zeros((3, 3))), Landmarks(np.zeros((4, 3))), "3 landmarks but source has 4"),
    (Landmarks(np.zeros((2, 3)), ["a", "b"]), Landmarks(np.zeros((2, 3)), ["a", "c"]), "only in target: 'b'"),
    (Landmarks(np.zeros((2, 3)), ["a", "a"]), Landmarks(np.zeros((2, 3)), ["a", "b"]), "duplicate label"),
])
def test_matching_errors(target, source, message):
    with pytest.raises(CombiregError, match=message):
        match_landmarks(target, source)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name,text,message", [
    ("empty.fcsv", "", "no landmarks"),
    ("comments.fcsv", "# CoordinateSystem = LPS\n", "no landmarks"),
    ("garbage.fcsv", "# CoordinateSystem = LPS\nhello world\n", "expected id,x,y,z"),
    ("nan.fcsv", "# CoordinateSystem = LPS\na,1,x,3\n", "not a number"),
    ("cs.fcsv", "# CoordinateSystem = XYZ\na,1,2,3\n", "unknown coordinate system"),
    ("bad.mrk.json", "{not json", "not valid JSON"),
    ("nomarkups.mrk.json", "{}", "no 'markups'"),
    ("cs.mrk.json", json.dumps({"markups": [{"coordinateSystem": "IJK", "controlPoints": []}]}),
     "unknown coordinateSystem"),
    ("empty.mrk.json", json.dumps({"markups": [{"controlPoints": []}]}), "no landmarks"),
    ("pos.mrk.json", json.dumps({"markups": [{"controlPoints": [{"position": [1, 2]}]}]}), "3 numbers"),
    ("empty.csv", "\n\n", "no landmarks"),
    ("cols.csv", "a,b,c\n1,2,3\n", "no coordinate columns"),
    ("text.csv", "Landmark,X,Y,Z\n1,2,three,4\n", "not a number"),
    ("inf.csv", "Landmark,X,Y,Z\n1,2,inf,4\n", "non-finite"),
    ("empty.txt", "", "no landmarks"),
    ("kind.txt", "points\n1\n1 2 3\n", "'point' or 'index'"),
    ("count.txt", "point\n3\n1 2 3\n", "says 3 points but the file has 1"),
    ("ncoord.txt", "point\n1\n1 2\n", "expected 3 coordinates"),
    ("binary.fcsv", "\x00\x01\x02", "not a text"),
    ("unknown.xyz", "1,2,3", "unknown landmark file type"),
])
def test_bad_landmark_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(CombiregError, match=message):
        read_landmarks(tmp_path / name)


def test_missing_file_and_index_without_reference(tmp_path):
    with pytest.raises(CombiregError, match="no such file"):
        read_landmarks(tmp_path / "missing.fcsv")
    (tmp_path / "i.txt").write_text("index\n1\n1 2 3\n")
    with pytest.raises(CombiregError, match="reference image"):
        read_landmarks(tmp_path / "i.txt")
    with pytest.raises(CombiregError, match="unknown landmark space"):
        read_landmarks(tmp_path / "i.txt", space="voxel")


def test_landmark_outside_the_field_is_named(oblique_geometry):
    field = np.zeros(oblique_geometry.shape + (3,), np.float32)
    pts = interior_points(oblique_geometry, 3)
    pts[1] = oblique_geometry.index_to_world(np.array([[-5.0, 2.0, 2.0]]))[0]
    lm = Landmarks(pts, ["in1", "far", "in2"])
    with pytest.raises(CombiregError, match="landmark 'far' .* outside"):
        compute_tre(field, oblique_geometry, lm, lm)


# ------------------------------------------------------------------------------ command
def test_tre_command_identity_on_samples(tmp_path):
    res = invoke("tre", "identity", CASE / "target_landmarks.fcsv", CASE / "source_landmarks.fcsv",
                 "--json", tmp_path / "t.json", "--csv", tmp_path / "t.csv")
    assert res.exit_code == 0, res.output
    case = json.loads((CASE / "case.json").read_text())
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["statistics"]["mean"] == pytest.approx(case["landmarks"]["initial_distance_mm"]["mean"], rel=1e-6)
    assert doc["statistics"]["n"] == len(doc["landmarks"]) == 131
    assert "robustness" in res.output and res.output.startswith("label")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 132


def test_tre_command_on_a_field(tmp_path, oblique_geometry, labelled):
    shift = np.array([1.0, 2.0, -0.5])
    io.write_displacement(tmp_path / "f.nii.gz", np.broadcast_to(shift, oblique_geometry.shape + (3,)),
                          oblique_geometry)
    write_landmarks(tmp_path / "t.csv", labelled)
    write_landmarks(tmp_path / "s.fcsv", Landmarks(labelled.points_lps_mm + shift, labelled.labels))
    res = invoke("tre", tmp_path / "f.nii.gz", tmp_path / "t.csv", tmp_path / "s.fcsv", "-q")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("TRE      0.000 ± 0.000 mm")


@pytest.mark.parametrize("case", ["field", "labels", "outside", "garbage", "json_dir"])
def test_tre_command_errors_are_one_line_and_write_nothing(tmp_path, oblique_geometry, labelled, case):
    io.write_image(tmp_path / "scalar.nii.gz", np.zeros(oblique_geometry.shape), oblique_geometry)
    io.write_displacement(tmp_path / "f.nii.gz", np.zeros(oblique_geometry.shape + (3,)), oblique_geometry)
    write_landmarks(tmp_path / "t.fcsv", labelled)
    write_landmarks(tmp_path / "s.fcsv", labelled)
    field, target, source, expect = tmp_path / "f.nii.gz", tmp_path / "t.fcsv", tmp_path / "s.fcsv", ""
    if case == "field":
        field, expect = tmp_path / "scalar.nii.gz", "3 components"
    elif case == "labels":
        write_landmarks(source, Landmarks(labelled.points_lps_mm, [f"Q{i}" for i in range(len(labelled))]))
        expect = "labels do not match"
    elif case == "outside":
        write_landmarks(target, Landmarks(labelled.points_lps_mm + 500.0, labelled.labels))
        expect = "outside"
    elif case == "garbage":
        target.write_text("garbage\n")
        expect = "expected id,x,y,z"
    json_path = tmp_path / ("sub" if case == "json_dir" else "out.json")
    if case == "json_dir":
        json_path.mkdir()
        expect = "is a directory"
    res = CliRunner().invoke(main, ["tre", str(field), str(target), str(source), "--json", str(json_path)])
    assert res.exit_code == 2, res.output
    assert expect in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


# ------------------------------------------------------------------------------ run --target-landmarks
SRC = f"{CASE}/source_t1.nii.gz,{CASE}/source_t2.nii.gz"
TGT = f"{CASE}/target_t1.nii.gz,{CASE}/target_t2.nii.gz"
TINY = "(NumberOfResolutions 1)\n(ImagePyramidSchedule 4 4 4)\n(MaximumNumberOfIterations 5)\n"


def test_run_reports_tre_before_and_after(tmp_path):
    (tmp_path / "p.txt").write_text(TINY)
    out = tmp_path / "out"
    res = invoke("run", SRC, TGT, "-o", out, "-p", tmp_path / "p.txt", "-q",
                 "--target-landmarks", CASE / "target_landmarks.fcsv", "--source-landmarks", CASE / "source_landmarks.fcsv")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    st = report["tre"]["statistics"]
    assert st["n"] == 131 and len(report["tre"]["landmarks"]) == 131
    assert f"TRE {st['initial_mean']:.3f} -> {st['mean']:.3f} mm" in res.output
    again = tre_from_files(out / "field.nii.gz", CASE / "target_landmarks.fcsv", CASE / "source_landmarks.fcsv")
    assert again.statistics["mean"] == pytest.approx(st["mean"], rel=1e-6)


@pytest.mark.parametrize("which", ["only_target", "garbage", "outside"])
def test_run_with_bad_landmarks_writes_nothing(tmp_path, which):
    out = tmp_path / "out"
    target = CASE / "target_landmarks.fcsv"
    if which == "garbage":
        target = tmp_path / "t.fcsv"
        target.write_text("# CoordinateSystem = LPS\n")
    elif which == "outside":
        target = tmp_path / "t.fcsv"
        lm = read_landmarks(CASE / "target_landmarks.fcsv")
        lm.points_lps_mm[3] += 1000.0
        write_landmarks(target, lm)
    args = ["run", SRC, TGT, "-o", str(out), "--target-landmarks", str(target)]
    if which != "only_target":
        args += ["--source-landmarks", str(CASE / "source_landmarks.fcsv")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert {"only_target": "give both", "garbage": "no landmarks", "outside": "'4'"}[which] in res.output
    assert not out.exists()
