"""Preprocessing: reorientation, resampling, N4, elastix pre-alignment, masks, `combireg preprocess`."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from combireg.elastix_driver import sync_elastix_clock
from combireg import Geometry, Image, io
from combireg import preprocess as pp
from combireg.cli.main import main
from combireg.errors import CombiregError
from tests.conftest import image_from_world_function, oblique_direction, smooth_pattern


def _random_image(geometry: Geometry, channels: int = 1, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    return Image(torch.from_numpy(rng.random((channels,) + geometry.shape).astype(np.float32)), geometry)


def _all_indices(geometry: Geometry) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    return np.stack([i, j, k], axis=-1).reshape(-1, 3)


def _point_error(estimate: np.ndarray, truth: np.ndarray, centre: np.ndarray, radius: float) -> float:
    """Largest distance between where two affines send the corners of a cube around ``centre``."""
    corners = centre + radius * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    hom = np.c_[corners, np.ones(len(corners))]
    return float(np.linalg.norm(hom @ (estimate - truth)[:3].T, axis=1).max())


# ------------------------------------------------------------------ reorientation
@pytest.mark.parametrize("code", ["RAS", "LPI", "SAR", "ILP"])
def test_reorient_keeps_world_positions_and_values(oblique_geometry, code):
    image = _random_image(oblique_geometry, channels=2)
    out = pp.reorient(image, code)
    g = out.geometry
    assert sorted(g.size) == sorted(oblique_geometry.size) and out.num_channels == 2
    # every new voxel sits exactly on an old voxel centre and holds its values
    new_index = _all_indices(g)
    old_index = oblique_geometry.world_to_index(g.index_to_world(new_index))
    np.testing.assert_allclose(old_index, np.rint(old_index), atol=1e-6)
    i, j, k = np.rint(old_index).astype(int).T
    values_new = out.numpy().reshape(2, -1)
    np.testing.assert_array_equal(values_new, image.numpy()[:, k, j, i])
    # the direction is the signed permutation closest to the code: each axis within the 17 degree
    # obliquity of the letter it was asked to point to
    wanted = np.stack([np.asarray(pp._LETTER_VECTORS[c]) for c in code], axis=1)
    cosines = np.sum(wanted * g.direction_matrix, axis=0)
    assert np.all(cosines > np.cos(np.deg2rad(18.0))), cosines
    assert pp.orientation_code(g) == code


def test_reorient_round_trip_and_axis_aligned_result():
    # grid axes point to I, L, A: an axis-aligned but permuted and flipped NIfTI-like grid
    direction = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float)
    g = Geometry((20, 16, 12), origin=(10.0, -4.0, 33.0), spacing=(1.1, 2.0, 3.0), direction=tuple(direction.ravel()))
    assert pp.orientation_code(g) == "ILA"
    image = _random_image(g)
    lps = pp.reorient(image, "lps")  # case-insensitive
    np.testing.assert_allclose(lps.geometry.direction_matrix, np.eye(3), atol=1e-12)
    assert lps.geometry.spacing == (2.0, 3.0, 1.1) and lps.geometry.size == (16, 12, 20)
    back = pp.reorient(pp.reorient(lps, "RAS"), "LPS")
    assert back.geometry == lps.geometry
    assert torch.equal(back.data, lps.data)
    # and back to the original code gives the original exactly
    again = pp.reorient(lps, "ILA")
    assert again.geometry.same_grid(g, tol=1e-9)
    assert torch.equal(again.data, image.data)
    assert pp.reorient_geometry(g, "RAS") == pp.reorient(image, "RAS").geometry


def test_reorient_round_trip_oblique(oblique_geometry):
    image = _random_image(oblique_geometry)
    assert pp.orientation_code(oblique_geometry) == "LPS"
    ras = pp.reorient(image, "RAS")
    assert pp.orientation_code(ras.geometry) == "RAS"
    back = pp.reorient(ras, "LPS")
    assert back.geometry.same_grid(oblique_geometry, tol=1e-9)
    assert torch.equal(back.data, image.data)


@pytest.mark.parametrize("code", ["LRS", "XYZ", "RA", "RASL"])
def test_reorient_refuses_bad_codes(oblique_geometry, code):
    with pytest.raises(CombiregError, match="orientation code"):
        pp.reorient(_random_image(oblique_geometry), code)


# ------------------------------------------------------------------ resampling
def _slow_function(points):
    r = points - np.array([12.0, -7.5, 30.0])
    return (np.sin(r[..., 0] / 20.0) + np.cos(r[..., 1] / 25.0) * np.sin(r[..., 2] / 22.0 + 0.4)
            + 0.01 * r[..., 2]).astype(np.float32)


@pytest.mark.parametrize("spacing", [2.5, (0.9, 1.0, 1.3)])
def test_resample_to_spacing_keeps_extent_and_values(oblique_geometry, spacing):
    image = image_from_world_function(oblique_geometry, _slow_function)
    image = Image(torch.cat([image.data, 2 * image.data]), oblique_geometry)
    out = pp.resample_to_spacing(image, spacing)
    g, g0 = out.geometry, oblique_geometry
    np.testing.assert_allclose(g.spacing, np.broadcast_to(spacing, 3))
    np.testing.assert_allclose(g.direction, g0.direction)
    # same field of view (to within one new voxel) and the same centre
    fov, fov0 = np.multiply(g.size, g.spacing), np.multiply(g0.size, g0.spacing)
    assert np.all(np.abs(fov - fov0) <= np.asarray(g.spacing) / 2 + 1e-6)
    centre = g.index_to_world(((np.asarray(g.size) - 1) / 2.0)[None])
    np.testing.assert_allclose(centre, g0.index_to_world(((np.asarray(g0.size) - 1) / 2.0)[None]), atol=1e-9)
    # values: the world function at the new voxel centres (interior; anti-aliasing barely
    # touches a function this smooth)
    expected = _slow_function(g.world_grid())
    error = np.abs(out.numpy()[0] - expected)[1:-1, 1:-1, 1:-1]
    assert error.max() < 0.02, error.max()
    np.testing.assert_allclose(out.numpy()[1], 2 * out.numpy()[0], rtol=1e-5, atol=1e-5)


def test_resample_nearest_and_bad_spacing(oblique_geometry):
    labels = Image(torch.from_numpy(np.random.default_rng(1).integers(0, 4, oblique_geometry.shape)
                                    .astype(np.float32))[None], oblique_geometry)
    out = pp.resample_to_spacing(labels, 3.0, interpolation="nearest")
    assert set(np.unique(out.numpy())) <= {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(CombiregError, match="spacing"):
        pp.resample_to_spacing(labels, -1.0)
    with pytest.raises(CombiregError, match="interpolation"):
        pp.resample_to_spacing(labels, 2.0, interpolation="cubic")
    same = pp.resample_to_geometry(labels, oblique_geometry)
    assert torch.equal(same.data, labels.data)


# ------------------------------------------------------------------ N4
def test_n4_reduces_a_synthetic_bias_field():
    g = Geometry((44, 40, 36), origin=(-30.0, -28.0, -25.0), spacing=(1.5, 1.6, 1.8),
                 direction=tuple(oblique_direction(11.0).ravel()))
    points = g.world_grid()
    r = points - points.reshape(-1, 3).mean(0)
    rho = np.linalg.norm(r / np.array([30.0, 28.0, 26.0]), axis=-1)
    tissue = np.where(rho < 1.0, 100.0, 0.0) + np.where(rho < 0.55, 50.0, 0.0)  # two classes, zero outside
    bias = np.exp(0.35 * r[..., 0] / 30.0 - 0.25 * (r[..., 1] / 28.0) ** 2 + 0.2 * r[..., 2] / 26.0)
    noise = np.random.default_rng(0).normal(0.0, 1.0, g.shape) * (tissue > 0)
    image = Image(torch.from_numpy((tissue * bias + noise).astype(np.float32))[None], g)
    homogeneous = (rho > 0.65) & (rho < 0.9)  # inside the outer class, away from its edges

    def cv(data):
        values = data[homogeneous]
        return values.std() / values.mean()

    before = cv(image.numpy()[0])
    corrected = pp.n4_bias_correction(image, iterations=(50, 50, 50))
    after = cv(corrected.numpy()[0])
    assert corrected.geometry == g and np.all(np.isfinite(corrected.numpy()))
    assert before > 0.1 and after < 0.4 * before, (before, after)
    # a mask restricts the fit and still corrects the whole image
    mask = Image(torch.from_numpy((rho < 1.0).astype(np.float32))[None], g)
    masked = pp.n4_bias_correction(image, mask, iterations=(50, 50, 50))
    assert cv(masked.numpy()[0]) < 0.4 * before


# ------------------------------------------------------------------ pre-alignment (elastix)
def _blob_pair(matrix_fn):
    """Source on an oblique anisotropic grid, target on an axis-aligned one; target(x) = source(A x)."""
    target_geometry = Geometry((40, 40, 36), origin=(-31.0, -30.0, -32.0), spacing=(1.6, 1.6, 1.8))
    source_geometry = Geometry((38, 40, 34), origin=(-26.0, -33.0, -27.0), spacing=(1.7, 1.6, 1.9),
                               direction=tuple(oblique_direction(9.0).ravel()))
    centre = target_geometry.world_grid().reshape(-1, 3).mean(0)
    matrix = matrix_fn(centre)

    def blob(p):
        return smooth_pattern(p, centre) * np.exp(-((p - centre) ** 2).sum(-1) / (2 * 15.0 ** 2))

    source = image_from_world_function(source_geometry, blob)
    target = image_from_world_function(target_geometry, lambda p: blob(p @ matrix[:3, :3].T + matrix[:3, 3]))
    return source, target, matrix, centre


def _affine_about(centre, linear, translation):
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + np.asarray(translation)
    return matrix


def _rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def test_elastix_adapter_recovers_a_known_affine():
    # NCC: one modality here; Mattes MI with 32 bins underestimated the scales by ~4 % on this
    # mostly-background blob (its histogram), the rigid test below covers MI
    linear = _rotation((0.3, -0.2, 1.0), 8.0) @ np.diag([1.08, 0.94, 1.05])
    source, target, truth, centre = _blob_pair(lambda c: _affine_about(c, linear, (3.0, -2.5, 2.0)))
    estimate = pp.prealign(source, target, "affine", metric="ncc", resolutions=3)
    assert estimate.shape == (4, 4) and np.allclose(estimate[3], (0, 0, 0, 1))
    np.testing.assert_allclose(estimate[:3, :3], truth[:3, :3], atol=0.01)
    assert _point_error(estimate, truth, centre, 20.0) < 0.3
    assert _point_error(np.eye(4), truth, centre, 20.0) > 4.0  # the problem was not trivial


def test_elastix_adapter_recovers_a_known_rigid_transform_with_masks():
    rotation = _rotation((1.0, 0.4, -0.3), 8.0)
    source, target, truth, centre = _blob_pair(lambda c: _affine_about(c, rotation, (-2.0, 3.5, 1.5)))
    inside = np.linalg.norm(target.geometry.world_grid() - centre, axis=-1) < 24.0
    target_mask = Image(torch.from_numpy(inside.astype(np.float32))[None], target.geometry)
    estimate = pp.prealign(source, target, "rigid", target_mask=target_mask, resolutions=3)
    np.testing.assert_allclose(estimate[:3, :3] @ estimate[:3, :3].T, np.eye(3), atol=1e-6)  # rigid
    assert _point_error(estimate, truth, centre, 20.0) < 0.3
    # the dense version is the same map: u(x) = A x - x
    u = pp.affine_displacement(estimate, target.geometry)
    x = target.geometry.world_grid()
    np.testing.assert_allclose(x + u, x @ estimate[:3, :3].T + estimate[:3, 3], atol=1e-3)
    # and resampling the source through it reproduces the target
    aligned = pp.warp_affine(source, estimate, target.geometry).numpy()[0]
    near = np.linalg.norm(x - centre, axis=-1) < 18.0
    assert np.abs(aligned - target.numpy()[0])[near].mean() < 0.02


def test_prealign_errors():
    source, target, _, centre = _blob_pair(lambda c: np.eye(4))
    with pytest.raises(CombiregError, match="unknown pre-alignment"):
        pp.prealign(source, target, "bspline")
    # a target mask in a corner the source does not reach: every sample maps outside it
    corner = np.zeros(target.geometry.shape, np.float32)
    corner[:3, :3, :3] = 1.0
    with pytest.raises(CombiregError, match="elastix rigid pre-alignment failed: .*samples"):
        pp.prealign(source, target, "rigid", target_mask=Image(torch.from_numpy(corner)[None], target.geometry),
                    initialization="none", resolutions=1, iterations=5)
    with pytest.raises(CombiregError, match="another grid"):
        pp.prealign(source, target, source_mask=Image(torch.ones((1,) + target.geometry.shape), target.geometry))


def test_sync_elastix_clock_puts_elastix_ahead_of_itk():
    """elastix's own modification clock must not lag ITK's, or its pyramids re-run every iteration."""
    import itk

    probe = itk.Image[itk.F, 3].New()
    clock = itk.ParameterObject.New()  # elastix's
    clock.Modified()
    for _ in range(max(0, clock.GetMTime() - probe.GetMTime()) + 5000):  # what reading or N4 do
        probe.Modified()
    assert sync_elastix_clock() > 5000
    clock.Modified()
    assert clock.GetMTime() > probe.GetMTime()
    assert sync_elastix_clock() < 1000  # already ahead: only tops the margin up


# ------------------------------------------------------------------ masks
def test_load_mask_checks_grid_and_emptiness(tmp_path, oblique_geometry):
    g = oblique_geometry
    values = np.zeros(g.shape, np.float32)
    values[5:10, 6:12, 7:20] = 5.0
    io.write_image(tmp_path / "mask.nii.gz", values, g)
    mask = pp.load_mask(tmp_path / "mask.nii.gz", g, role="target")
    assert mask.data.shape == (1,) + g.shape and mask.data.dtype == torch.float32
    assert set(np.unique(mask.numpy())) == {0.0, 1.0} and mask.numpy().sum() == 5 * 6 * 13
    other = Geometry(g.size, tuple(np.add(g.origin, 2.0)), g.spacing, g.direction)
    io.write_image(tmp_path / "shifted.nii.gz", values, other)
    with pytest.raises(CombiregError, match=r"source mask .*shifted.nii.gz: lies on another grid than the source"):
        pp.load_mask(tmp_path / "shifted.nii.gz", g, role="source")
    io.write_image(tmp_path / "empty.nii.gz", np.zeros(g.shape), g)
    with pytest.raises(CombiregError, match="empty"):
        pp.load_mask(tmp_path / "empty.nii.gz", g)
    with pytest.raises(CombiregError, match="target mask: .*no such file"):
        pp.load_mask(tmp_path / "nope.nii.gz", g)
    assert torch.equal(pp.load_mask(mask, g).data, mask.data)  # an Image is checked, not read


def test_affine_file_round_trip(tmp_path):
    matrix = _affine_about(np.array([1.0, 2.0, 3.0]), _rotation((0, 0, 1), 5.0), (1.0, -2.0, 0.5))
    pp.write_affine(tmp_path / "affine.txt", matrix)
    assert (tmp_path / "affine.txt").read_text().startswith("# combireg affine")
    np.testing.assert_allclose(pp.read_affine(tmp_path / "affine.txt"), matrix, atol=1e-9)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "affine.txt"), matrix, atol=1e-9)
    (tmp_path / "bad.txt").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(CombiregError, match="4x4"):
        pp.read_affine(tmp_path / "bad.txt")


# ------------------------------------------------------------------ CLI
def invoke(*args):
    return CliRunner().invoke(main, ["preprocess", *[str(a) for a in args]], catch_exceptions=False)


def test_cli_orient_and_spacing(tmp_path, oblique_geometry):
    image = image_from_world_function(oblique_geometry, _slow_function)
    io.write_image(tmp_path / "img.nii.gz", image)
    out = tmp_path / "out"
    res = invoke(tmp_path / "img.nii.gz", "-o", out, "--orient", "RAS", "--spacing", "2")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["image_0.nii.gz", "report.json"]
    written = io.read_image(out / "image_0.nii.gz")
    expected = pp.resample_to_spacing(pp.reorient(io.read_image(tmp_path / "img.nii.gz"), "RAS"), 2.0)
    assert written.geometry.same_grid(expected.geometry)
    assert pp.orientation_code(written.geometry) == "RAS" and written.geometry.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(written.numpy(), expected.numpy(), atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["orient", "spacing"]
    assert report["input_orientation"] == "LPS" and report["output_orientation"] == "RAS"
    # not empty now: needs --overwrite
    again = invoke(tmp_path / "img.nii.gz", "-o", out, "--orient", "RAS")
    assert again.exit_code == 2 and "not empty" in again.output


def test_cli_align_to_writes_affine_and_field(tmp_path):
    rotation = _rotation((0.2, 1.0, 0.1), 7.0)
    source, target, truth, centre = _blob_pair(lambda c: _affine_about(c, rotation, (2.5, 1.0, -3.0)))
    io.write_image(tmp_path / "src.nii.gz", source)
    io.write_image(tmp_path / "tgt.nii.gz", target)
    out = tmp_path / "aligned"
    res = invoke(tmp_path / "src.nii.gz", "-o", out, "--align-to", tmp_path / "tgt.nii.gz", "--transform", "rigid")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["affine.txt", "field.nii.gz", "image_0.nii.gz", "report.json"]
    affine = np.loadtxt(out / "affine.txt")
    assert _point_error(affine, truth, centre, 20.0) < 0.4
    field, field_geometry = io.read_displacement(out / "field.nii.gz")
    assert field_geometry.same_grid(target.geometry)
    np.testing.assert_allclose(field, pp.affine_displacement(affine, target.geometry), atol=1e-4)
    aligned = io.read_image(out / "image_0.nii.gz")
    assert aligned.geometry.same_grid(target.geometry)
    near = np.linalg.norm(target.geometry.world_grid() - centre, axis=-1) < 18.0
    assert np.abs(aligned.numpy()[0] - target.numpy()[0])[near].mean() < 0.03


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("orient", "--orient 'XYZ'"),
    ("spacing", "--spacing"),
    ("transform", "need --align-to"),
    ("nothing", "nothing to do"),
    ("mask_grid", "lies on another grid than the image"),
    ("empty_mask", "empty"),
    ("unused_mask", "--mask is used by"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, oblique_geometry, case, message):
    g = oblique_geometry
    io.write_image(tmp_path / "img.nii.gz", _random_image(g))
    io.write_image(tmp_path / "shifted_mask.nii.gz", np.ones(g.shrink((2, 2, 2)).shape), g.shrink((2, 2, 2)))
    io.write_image(tmp_path / "empty_mask.nii.gz", np.zeros(g.shape), g)
    image, args = tmp_path / "img.nii.gz", ["--orient", "RAS"]
    if case == "missing":
        image = tmp_path / "nope.nii.gz"
    elif case == "orient":
        args = ["--orient", "XYZ"]
    elif case == "spacing":
        args = ["--spacing", "1,2"]
    elif case == "transform":
        args = ["--transform", "affine"]
    elif case == "nothing":
        args = []
    elif case == "mask_grid":
        args = ["--n4", "--mask", tmp_path / "shifted_mask.nii.gz"]
    elif case == "empty_mask":
        args = ["--n4", "--mask", tmp_path / "empty_mask.nii.gz"]
    elif case == "unused_mask":
        args = ["--orient", "RAS", "--mask", tmp_path / "empty_mask.nii.gz"]
    out = tmp_path / "result" / "out"
    res = invoke(image, "-o", out, *args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("combireg: error: ") and message in lines[0], res.output
    assert not (tmp_path / "result").exists()
