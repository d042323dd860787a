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


def test_landmarks_outside_the_grid_get_the_edge_values_and_a_count(oblique_geometry, caplog):
    """Points just outside the grid are mapped with the value at the nearest border voxel (the
    field is constant beyond its edge), counted and named in one warning; nothing raises."""
    field = known_displacement(oblique_geometry)
    pts = interior_points(oblique_geometry, 4)
    edge_index = np.array([[-0.8, 2.0, 3.0], [5.0, oblique_geometry.size[1] - 1 + 0.6, 4.0]])
    pts[1:3] = oblique_geometry.index_to_world(edge_index)
    lm = Landmarks(pts, ["in1", "left", "back", "in2"])
    with caplog.at_level(logging.WARNING, logger="combireg.landmarks"):
        res = compute_tre(field, oblique_geometry, lm, lm)
    assert res.outside.tolist() == [False, True, True, False] and res.statistics["n_outside_grid"] == 2
    assert "2 of 4 target landmark(s) lie outside the field's grid ('left', 'back')" in caplog.text
    clamped = np.clip(edge_index, 0, np.asarray(oblique_geometry.size) - 1)
    for row, index in zip((1, 2), np.rint(clamped).astype(int)):
        expected = field[index[2], index[1], index[0]]
        np.testing.assert_allclose(res.mapped_points[row] - pts[row], expected, atol=1e-5)
    assert [r["outside_grid"] for r in res.rows()] == [False, True, True, False]
    # before a registration (no field): a warning, not an error
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="combireg.landmarks"):
        assert compute_tre(None, oblique_geometry, lm, lm).statistics["n_outside_grid"] == 2
    assert "outside the target image grid" in caplog.text


def test_landmarks_remember_their_coordinate_system(tmp_path, oblique_geometry, labelled):
    for name, kwargs, space in [("a.fcsv", {"space": "ras"}, "ras"), ("b.fcsv", {}, "lps"), ("c.mrk.json", {"space": "ras"}, "ras"),
                                ("d.csv", {"space": "index", "reference": oblique_geometry}, "index"),
                                ("e.txt", {}, "lps"), ("f.csv", {}, "lps")]:
        write_landmarks(tmp_path / name, labelled, **kwargs)
        back = read_landmarks(tmp_path / name, reference=oblique_geometry)
        assert back.space == space, name
        np.testing.assert_allclose(back.points_lps_mm, labelled.points_lps_mm, atol=1e-5)


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


@pytest.mark.parametrize("case", ["field", "labels", "garbage", "json_dir"])
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


@pytest.mark.parametrize("which", ["only_target", "garbage"])
def test_run_with_bad_landmarks_writes_nothing(tmp_path, which):
    out = tmp_path / "out"
    target = CASE / "target_landmarks.fcsv"
    if which == "garbage":
        target = tmp_path / "t.fcsv"
        target.write_text("# CoordinateSystem = LPS\n")
    args = ["run", SRC, TGT, "-o", str(out), "--target-landmarks", str(target)]
    if which != "only_target":
        args += ["--source-landmarks", str(CASE / "source_landmarks.fcsv")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert {"only_target": "give both", "garbage": "no landmarks"}[which] in res.output
    assert not out.exists()


def test_landmarks_outside_the_target_grid_do_not_sink_a_run(tmp_path, caplog):
    """3 landmarks just outside the grid: the run goes on, they are mapped with the field's
    edge values, counted in report.json and in the printed TRE line."""
    target = tmp_path / "t.fcsv"
    lm = read_landmarks(CASE / "target_landmarks.fcsv")
    geometry = io.read_image(CASE / "target_t1.nii.gz").geometry
    for k, row in enumerate((3, 10, 20)):
        index = geometry.world_to_index(lm.points_lps_mm[row:row + 1])[0]
        index[k] = -0.7 if k != 1 else geometry.size[1] - 1 + 0.7  # 0.7 voxel beyond the edge
        lm.points_lps_mm[row] = geometry.index_to_world(index[None])[0]
    write_landmarks(target, lm)
    (tmp_path / "p.txt").write_text(TINY)
    out = tmp_path / "out"
    res = invoke("run", SRC, TGT, "-o", out, "-p", tmp_path / "p.txt", "-q", "--target-landmarks", target,
                 "--source-landmarks", CASE / "source_landmarks.fcsv")
    assert res.exit_code == 0, res.output
    st = json.loads((out / "report.json").read_text())["tre"]["statistics"]
    assert st["n"] == 131 and st["n_outside_grid"] == 3
    assert "3 outside the target grid (edge values)" in res.output
    assert "3 of 131 target landmark(s) lie outside" in caplog.text
    tre = invoke("tre", out / "field.nii.gz", target, CASE / "source_landmarks.fcsv", "-q")
    assert tre.exit_code == 0 and "3 target landmark(s) outside the field's grid" in tre.output


def test_sample_displacement_equals_scipy_linear_nearest(oblique_geometry):
    """The eight-corner gather is scipy's map_coordinates(order=1, mode="nearest"), points
    outside the grid (edge values) and a one-voxel axis included."""
    from scipy.ndimage import map_coordinates

    from combireg.landmarks import sample_displacement

    rng = np.random.default_rng(0)
    flat = Geometry((7, 6, 1), origin=(1.0, 2.0, 3.0), spacing=(1.0, 1.5, 2.0))
    for geometry in (oblique_geometry, flat):
        field = rng.normal(size=geometry.shape + (3,)).astype(np.float32)
        index = rng.uniform(-3.0, 3.0, size=(400, 3)) \
            + rng.uniform(0, 1, size=(400, 3)) * (np.asarray(geometry.size) - 1)
        points = geometry.index_to_world(index)
        coords = geometry.world_to_index(points)[:, ::-1].T
        reference = np.stack([map_coordinates(field[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
        np.testing.assert_allclose(sample_displacement(field, geometry, points), reference, rtol=0, atol=1e-6)
