import numpy as np
import pytest
import torch

from combireg import Image, io
from combireg.errors import CombiregError


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_image_round_trip_keeps_geometry(tmp_path, oblique_geometry, suffix):
    data = torch.rand((1,) + oblique_geometry.shape)
    path = tmp_path / f"img{suffix}"
    io.write_image(path, Image(data, oblique_geometry))
    back = io.read_image(path)
    assert back.geometry.same_grid(oblique_geometry, tol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, oblique_geometry.direction, atol=1e-5)
    np.testing.assert_allclose(back.data.numpy(), data.numpy(), atol=1e-6)


def test_displacement_round_trip(tmp_path, oblique_geometry):
    u = np.random.default_rng(1).normal(size=oblique_geometry.shape + (3,)).astype(np.float32)
    io.write_displacement(tmp_path / "f.nii.gz", u, oblique_geometry)
    back, geometry = io.read_displacement(tmp_path / "f.nii.gz")
    assert geometry.same_grid(oblique_geometry, tol=1e-5)
    np.testing.assert_array_equal(back, u)


def test_written_field_is_itk_vector_image(tmp_path, oblique_geometry):
    import itk

    u = np.zeros(oblique_geometry.shape + (3,), np.float32)
    u[..., 0] = 1.25
    io.write_displacement(tmp_path / "f.nii.gz", u, oblique_geometry)
    img = itk.imread(str(tmp_path / "f.nii.gz"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert itk.template(img)[1][0] == itk.Vector[itk.F, 3]
    np.testing.assert_allclose(np.asarray(img.GetSpacing()), oblique_geometry.spacing, rtol=1e-6)


def test_int16_writing_rounds_and_clips(tmp_path, oblique_geometry):
    data = np.full(oblique_geometry.shape, 40000.0, np.float32)
    data[0, 0, 0] = 1.6
    io.write_image(tmp_path / "i.nii.gz", data, oblique_geometry, dtype=np.int16)
    back = io.read_image(tmp_path / "i.nii.gz").numpy()[0]
    assert back[0, 0, 0] == 2 and back[1, 1, 1] == 32767


def test_read_channels_rejects_different_grids(tmp_path, oblique_geometry):
    io.write_image(tmp_path / "a.nii.gz", np.ones(oblique_geometry.shape), oblique_geometry)
    other = oblique_geometry.shrink((2, 2, 2))
    io.write_image(tmp_path / "b.nii.gz", np.ones(other.shape), other)
    with pytest.raises(CombiregError, match="another grid"):
        io.read_channels([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], role="source")


def test_read_errors(tmp_path, oblique_geometry):
    with pytest.raises(CombiregError, match="no such file"):
        io.read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(CombiregError, match="cannot read"):
        io.read_image(tmp_path / "junk.nii.gz")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(CombiregError, match="unsupported image format"):
        io.read_image(tmp_path / "x.png")
    nan = np.ones(oblique_geometry.shape, np.float32)
    nan[2, 3, 4] = np.nan
    # .mha keeps NaN on disk (ITK's NIfTI writer stores it as 0)
    io.write_image(tmp_path / "nan.mha", nan, oblique_geometry)
    with pytest.raises(CombiregError, match="1 NaN/Inf"):
        io.read_image(tmp_path / "nan.mha")


def test_not_3d(tmp_path):
    import itk

    img = itk.image_from_array(np.ones((8, 9), np.float32))
    itk.imwrite(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(CombiregError, match="3-D"):
        io.read_image(tmp_path / "flat.nii.gz")
