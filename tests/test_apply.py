"""combireg.apply and `combireg apply`: images and landmarks through a field, against ITK.

The field lies on an oblique, anisotropic grid; the input images on another oblique grid.
ITK's DisplacementFieldTransform with ResampleImageFilter (nearest, linear, B-spline
interpolators) and TransformPoint are the independent references.
"""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import combireg
from combireg import Geometry, io
from combireg.apply import apply_field, map_landmarks, warp_array
from combireg.cli.main import main
from combireg.errors import CombiregError
from combireg.landmarks import Landmarks, read_landmarks, write_landmarks
from tests.conftest import ROOT, known_displacement, oblique_direction

CASE = ROOT / "data_samples" / "case0000"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def input_geometry() -> Geometry:
    """The input's own grid: larger, other spacing, another oblique direction, shifted origin."""
    return Geometry((40, 36, 30), origin=(2.0, -16.0, 22.0), spacing=(1.3, 1.1, 1.7),
                    direction=tuple(oblique_direction(-11.0).ravel()))


@pytest.fixture
def field(tmp_path, oblique_geometry):
    u = known_displacement(oblique_geometry)
    io.write_displacement(tmp_path / "field.nii.gz", u, oblique_geometry)
    return tmp_path / "field.nii.gz", u


def _label_map(geometry: Geometry, seed: int = 0) -> np.ndarray:
    """Blocky labels (uint16, values up to 1000) in world coordinates: many boundaries to get wrong."""
    world = geometry.world_grid()
    rng = np.random.default_rng(seed)
    values = rng.choice([0, 2, 5, 17, 300, 1000], size=(6, 6, 6))
    cell = np.floor((world - world.reshape(-1, 3).min(0)) / 6.0).astype(int) % 6
    return values[cell[..., 0], cell[..., 1], cell[..., 2]].astype(np.uint16)


def _itk_resample(input_path, field_path, reference_path, interpolator: str, pixel=None):
    import itk

    field = itk.imread(str(field_path))
    field_d = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    field_d.CopyInformation(field)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field_d)
    moving = itk.imread(str(input_path), pixel) if pixel is not None else itk.imread(str(input_path))
    reference = itk.imread(str(reference_path), itk.F)
    if interpolator == "nearest":
        interp = itk.NearestNeighborInterpolateImageFunction.New(moving)
    elif interpolator == "bspline":
        interp = itk.BSplineInterpolateImageFunction.New(moving)
    else:
        interp = itk.LinearInterpolateImageFunction.New(moving)
    out = itk.resample_image_filter(moving, transform=transform, interpolator=interp, use_reference_image=True,
                                    reference_image=reference, default_pixel_value=0)
    return itk.array_from_image(out), transform


def _inner(index: np.ndarray, geometry: Geometry, margin: float) -> np.ndarray:
    size = np.asarray(geometry.size, dtype=float)
    return np.all((index >= margin) & (index <= size - 1 - margin), axis=1)


# ------------------------------------------------------------------------------ images
def test_warped_label_map_equals_an_itk_nearest_neighbour_warp(tmp_path, field, oblique_geometry, input_geometry):
    """--labels: the uint16 type and every value kept, each voxel equal to ITK's nearest neighbour
    through the same field (world coordinates, two different oblique grids)."""
    field_path, _ = field
    labels = _label_map(input_geometry)
    io.write_image(tmp_path / "labels.nii.gz", labels, input_geometry, dtype=np.uint16)
    io.write_image(tmp_path / "ref.nii.gz", np.zeros(oblique_geometry.shape), oblique_geometry)
    res = invoke("apply", field_path, tmp_path / "labels.nii.gz", "-o", tmp_path / "warped.nii.gz", "--labels")
    assert res.exit_code == 0, res.output
    assert "uint16 kept" in res.output
    ours, geometry = io.read_array(tmp_path / "warped.nii.gz")
    assert ours.dtype == np.uint16 and geometry.same_grid(oblique_geometry, tol=1e-5)
    theirs, _ = _itk_resample(tmp_path / "labels.nii.gz", field_path, tmp_path / "ref.nii.gz", "nearest")
    assert theirs.dtype == np.uint16
    np.testing.assert_array_equal(ours, theirs)
    assert set(np.unique(ours)) <= set(np.unique(labels)) and len(np.unique(ours)) >= 5


@pytest.mark.parametrize("interpolation, tolerance", [("linear", 1e-4), ("bspline", 2e-3)])
def test_warped_image_equals_itk_inside_the_input(tmp_path, field, oblique_geometry, input_geometry,
                                                  interpolation, tolerance):
    import itk

    from tests.conftest import smooth_pattern

    field_path, u = field
    centre = input_geometry.world_grid().reshape(-1, 3).mean(0)
    image = smooth_pattern(input_geometry.world_grid(), centre)
    io.write_image(tmp_path / "in.nrrd", image, input_geometry)
    io.write_image(tmp_path / "ref.nii.gz", np.zeros(oblique_geometry.shape), oblique_geometry)
    result = apply_field(field_path, tmp_path / "in.nrrd", tmp_path / "out.mha", interpolation=interpolation)
    theirs, _ = _itk_resample(tmp_path / "in.nrrd", field_path, tmp_path / "ref.nii.gz", interpolation, itk.F)
    index = input_geometry.world_to_index((oblique_geometry.world_grid() + u).reshape(-1, 3))
    inner = _inner(index, input_geometry, 2.0).reshape(oblique_geometry.shape)
    assert inner.mean() > 0.3
    ours = io.read_image(tmp_path / "out.mha").numpy()[0]
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=tolerance)
    np.testing.assert_array_equal(ours, result.array)
    # and where x + u(x) leaves the input, 0
    index_far = ~_inner(index, input_geometry, -1.0).reshape(oblique_geometry.shape)
    assert (ours[index_far] == 0).all()


def test_field_of_a_run_reproduces_warped_0(tmp_path):
    """`combireg apply field.nii.gz SOURCE` is exactly warped_0 of the run, and the inverse field
    carries the target back onto the source grid."""
    params = tmp_path / "p.txt"
    params.write_text("(NumberOfResolutions 1)\n(ImagePyramidSchedule 4 4 4)\n(MaximumNumberOfIterations 10)\n"
                      "(PreAlignment \"none\")\n")
    out = tmp_path / "run"
    res = invoke("run", CASE / "source_t1.nii.gz", CASE / "target_t1.nii.gz", "-o", out, "-p", params, "-q")
    assert res.exit_code == 0, res.output
    result = combireg.apply_field(out / "field.nii.gz", CASE / "source_t1.nii.gz", tmp_path / "w.nii.gz")
    warped = io.read_image(out / "warped_0.nii.gz").numpy()[0]
    np.testing.assert_allclose(io.read_image(tmp_path / "w.nii.gz").numpy()[0], warped, atol=1e-5)
    assert result.inside_fraction > 0.95
    back = apply_field(out / "field_inverse.nii.gz", CASE / "target_t1.nii.gz")
    assert back.geometry.same_grid(io.read_image(CASE / "source_t1.nii.gz").geometry)


# ------------------------------------------------------------------------------ landmarks
def test_mapped_points_agree_with_trilinear_sampling_of_the_field(tmp_path, field, oblique_geometry):
    """p + u(p) within 0.01 mm of ITK's TransformPoint (linear interpolation of the field), at
    random world points of an oblique, anisotropic grid."""
    import itk

    field_path, u = field
    rng = np.random.default_rng(7)
    points = oblique_geometry.index_to_world(rng.uniform(0.2, np.asarray(oblique_geometry.size) - 1.2, (60, 3)))
    mapped = map_landmarks(Landmarks(points), u, oblique_geometry)
    _, transform = _itk_resample(field_path, field_path, field_path, "linear", itk.Vector[itk.F, 3])
    theirs = np.array([list(transform.TransformPoint([float(v) for v in p])) for p in points])
    assert np.abs(mapped.landmarks.points_lps_mm - theirs).max() < 0.01
    assert mapped.n_outside == 0 and np.abs(mapped.landmarks.points_lps_mm - points).max() > 1.0


@pytest.mark.parametrize("name, kwargs, marker", [
    ("t.fcsv", {"space": "ras"}, "# CoordinateSystem = RAS"),
    ("t.mrk.json", {"space": "lps"}, '"coordinateSystem": "LPS"'),
    ("t.csv", {}, "Landmark,X,Y,Z"),
    ("t_ras.csv", {"space": "ras"}, "label,r,a,s"),
    ("t.txt", {}, "point"),
    ("t_index.txt", {"space": "index", "reference": "FIELD_GRID"}, "index"),
])
def test_landmark_files_keep_their_format_and_coordinate_system(tmp_path, field, oblique_geometry, input_geometry,
                                                                 name, kwargs, marker):
    field_path, u = field
    rng = np.random.default_rng(3)
    points = oblique_geometry.index_to_world(rng.uniform(1, np.asarray(oblique_geometry.size) - 2, (5, 3)))
    lm = Landmarks(points, [f"L{i}" for i in range(5)])
    if kwargs.get("reference") == "FIELD_GRID":
        kwargs = {**kwargs, "reference": oblique_geometry}
    write_landmarks(tmp_path / name, lm, **kwargs)
    out = tmp_path / ("out_" + name)
    args = ["apply", field_path, tmp_path / name, "-o", out]
    if "index" in name:
        io.write_image(tmp_path / "other.nii.gz", np.zeros(input_geometry.shape), input_geometry)
        args += ["--reference", tmp_path / "other.nii.gz"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("mapped 5 landmark(s) ->")
    text = out.read_text()
    assert marker in text.splitlines()[0] or marker in text
    reference = input_geometry if "index" in name else None
    back = read_landmarks(out, reference=reference, space=kwargs.get("space"))
    expected = map_landmarks(lm, u, oblique_geometry).landmarks.points_lps_mm
    np.testing.assert_allclose(back.points_lps_mm, expected, atol=1e-4)
    if name.endswith((".fcsv", ".json", ".csv")):
        assert back.labels == lm.labels


def test_brats_reg_landmarks_through_the_inverse_field(tmp_path, oblique_geometry):
    """A BraTS-Reg CSV stays a BraTS-Reg CSV (Landmark,X,Y,Z, LPS, labels kept); points just
    outside the grid are mapped with the edge values and counted."""
    shift = np.array([1.5, -2.0, 0.5])
    io.write_displacement(tmp_path / "inv.nii.gz", np.broadcast_to(shift, oblique_geometry.shape + (3,)),
                          oblique_geometry)
    index = np.array([[3.0, 4.0, 5.0], [-0.6, 2.0, 2.0], [10.0, 9.0, 8.0]])
    points = oblique_geometry.index_to_world(index)
    (tmp_path / "fu.csv").write_text("Landmark,X,Y,Z\n" + "".join(
        f"{i + 1},{p[0]:.6f},{p[1]:.6f},{p[2]:.6f}\n" for i, p in enumerate(points)))
    res = invoke("apply", tmp_path / "inv.nii.gz", tmp_path / "fu.csv", "-o", tmp_path / "pred.csv")
    assert res.exit_code == 0, res.output
    assert "3 landmark(s), 1 outside the field's grid (edge values)" in res.output
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "Landmark,X,Y,Z" and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2", "3"]
    back = read_landmarks(tmp_path / "pred.csv")
    np.testing.assert_allclose(back.points_lps_mm, points + shift, atol=1e-5)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case, message", [
    ("unknown_output", "unknown format"),
    ("image_to_landmarks", "must be an image file"),
    ("missing_input", "no such file"),
    ("no_folder", "does not exist"),
])
def test_apply_bad_input_is_one_line_and_writes_nothing(tmp_path, field, oblique_geometry, case, message):
    """Beside README's bad-input rows for apply (tests/test_bad_input.py)."""
    field_path, _ = field
    image = tmp_path / "img.nii.gz"
    io.write_image(image, np.ones(oblique_geometry.shape), oblique_geometry)
    args, out = [field_path, image], tmp_path / "out.nii.gz"
    if case == "unknown_output":
        out = tmp_path / "out.png"
    elif case == "image_to_landmarks":
        out = tmp_path / "out.fcsv"
    elif case == "missing_input":
        args = [field_path, tmp_path / "missing.nii.gz"]
    elif case == "no_folder":
        out = tmp_path / "nowhere" / "out.nii.gz"
    res = CliRunner().invoke(main, ["apply", *map(str, args), "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("combireg: error: ") and message in lines[0], res.output
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_apply_from_python_on_objects(field, oblique_geometry):
    _, u = field
    labels = _label_map(oblique_geometry, seed=2).astype(np.int32)
    zero = np.zeros_like(u)
    same = warp_array(labels, oblique_geometry, zero, oblique_geometry, interpolation="nearest")
    np.testing.assert_array_equal(same.array, labels)  # the identity moves nothing
    assert same.array.dtype == np.int32 and same.inside_fraction == 1.0
    assert same.to_image().geometry is oblique_geometry and same.to_image().data.dtype == torch.float32
    centre = oblique_geometry.index_to_world(np.array([[5.0, 6.0, 7.0]]))
    moved = apply_field((u, oblique_geometry), Landmarks(centre, ["c"]))
    np.testing.assert_allclose(moved.landmarks.points_lps_mm[0], centre[0] + u[7, 6, 5], atol=1e-5)  # at a voxel centre
    assert moved.landmarks.labels == ["c"] and moved.n_outside == 0
    with pytest.raises(CombiregError, match="unknown interpolation"):
        warp_array(labels, oblique_geometry, zero, oblique_geometry, interpolation="cubic")
