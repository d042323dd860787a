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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, oblique_geometry, suffix):
    """ITK writes NaN/Inf to disk in every format, but its NIfTI reader turns them into 0: the
    NIfTI voxel block is read again with numpy. Integer images are read as they are."""
    data = np.ones(oblique_geometry.shape, np.float32)
    data[2, 3, 4], data[5, 6, 7], data[1, 1, 1] = np.nan, np.inf, -np.inf
    path = tmp_path / f"bad{suffix}"
    io.write_image(path, data, oblique_geometry)
    for reader in (io.read_image, io.read_array):
        with pytest.raises(CombiregError, match="contains 3 NaN/Inf voxels"):
            reader(path)
    data[2, 3, 4] = data[5, 6, 7] = data[1, 1, 1] = 0.0
    io.write_image(path, data, oblique_geometry)
    assert io.read_image(path).numpy().sum() == data.sum()


def _nifti1_bytes(data: np.ndarray, order: str, spacing=(1.5, 1.2, 2.0)) -> bytes:
    """A minimal NIfTI-1 file (float32, sform = diag(spacing)) in either byte order."""
    import struct

    hdr = bytearray(348)
    struct.pack_into(order + "i", hdr, 0, 348)
    struct.pack_into(order + "8h", hdr, 40, 3, *reversed(data.shape), 1, 1, 1, 1)
    struct.pack_into(order + "2h", hdr, 70, 16, 32)  # datatype float32, bitpix
    struct.pack_into(order + "8f", hdr, 76, 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into(order + "2f", hdr, 108, 352.0, 1.0)  # vox_offset, scl_slope
    struct.pack_into(order + "h", hdr, 254, 1)  # sform_code
    for row in range(3):
        values = [0.0] * 4
        values[row] = spacing[row]
        struct.pack_into(order + "4f", hdr, 280 + 16 * row, *values)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + b"\0" * 4 + data.astype(order + "f4").tobytes()


@pytest.mark.parametrize("order", ["<", ">"])
def test_nifti_nan_is_found_in_either_byte_order(tmp_path, order):
    import itk

    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "hand.nii"
    path.write_bytes(_nifti1_bytes(data, order))
    assert np.isnan(itk.array_from_image(itk.imread(str(path), itk.F))).sum() == 0  # why the raw read exists
    assert io.nifti_nonfinite_count(path) == 1
    with pytest.raises(CombiregError, match="1 NaN/Inf"):
        io.read_image(path)


def test_nifti2_headers_are_parsed(tmp_path):
    import struct

    data = np.ones((3, 4, 5), np.float32)
    data[0, 0, 0] = np.inf
    hdr = bytearray(540)
    struct.pack_into("<i", hdr, 0, 540)
    struct.pack_into("<2h", hdr, 12, 16, 32)
    struct.pack_into("<8q", hdr, 16, 3, 5, 4, 3, 1, 1, 1, 1)
    struct.pack_into("<q", hdr, 168, 544)
    (tmp_path / "n2.nii").write_bytes(bytes(hdr) + b"\0" * 4 + data.tobytes())
    assert io.nifti_nonfinite_count(tmp_path / "n2.nii") == 1
    (tmp_path / "short.nii").write_bytes(bytes(hdr) + b"\0" * 10)
    with pytest.raises(CombiregError, match="shorter"):
        io.nifti_nonfinite_count(tmp_path / "short.nii")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
def test_read_array_keeps_the_pixel_type(tmp_path, oblique_geometry, dtype):
    labels = (np.arange(np.prod(oblique_geometry.shape)).reshape(oblique_geometry.shape) % 7).astype(dtype)
    labels[0, 0, 0] = 200
    io.write_image(tmp_path / "l.nii.gz", labels, oblique_geometry, dtype=dtype)
    array, geometry = io.read_array(tmp_path / "l.nii.gz")
    assert array.dtype == np.dtype(dtype) and geometry.same_grid(oblique_geometry, tol=1e-5)
    np.testing.assert_array_equal(array, labels)


def test_not_3d(tmp_path):
    import itk

    img = itk.image_from_array(np.ones((8, 9), np.float32))
    itk.imwrite(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(CombiregError, match="3-D"):
        io.read_image(tmp_path / "flat.nii.gz")
