"""All file-format code: scalar images and displacement fields, through ITK.

ITK is imported lazily so that the rest of the library (and its tests) start fast.
Displacement fields are written as ITK vector images with three float32 components on the
grid they are defined on, in LPS millimetres (the elastix/ITK/ANTs convention).

NaN and Inf voxels are refused in every format (:func:`read_image`, :func:`read_array`). ITK's
NIfTI reader (ITK 5.4, the vendored ``nifti_read_buffer``) silently replaces every non-finite
float with 0, so for NIfTI files the voxel block is also read here with numpy, straight from
the file (:func:`nifti_nonfinite_count`); MetaImage and NRRD keep NaN/Inf and are checked on
ITK's array.
"""
from __future__ import annotations

import gzip
import os
import shutil
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import CombiregError
from .geometry import Geometry
from .image import Image

__all__ = [
    "SUPPORTED_SUFFIXES",
    "read_image",
    "read_array",
    "read_channels",
    "nifti_nonfinite_count",
    "write_image",
    "read_displacement",
    "write_displacement",
    "geometry_from_itk",
]

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def _itk():
    # Why lazy: importing itk costs about a second; most of the library never needs it.
    import itk

    return itk


def _check_suffix(path: Path) -> None:
    name = path.name.lower()
    if not any(name.endswith(s) for s in SUPPORTED_SUFFIXES):
        raise CombiregError(
            f"{path}: unsupported image format (use one of {', '.join(SUPPORTED_SUFFIXES)})"
        )


def geometry_from_itk(itk_image) -> Geometry:
    """The :class:`Geometry` of an ITK image (must be 3-D)."""
    direction = np.asarray(itk_image.GetDirection(), dtype=np.float64).reshape(-1)
    return Geometry(
        size=tuple(int(v) for v in itk_image.GetLargestPossibleRegion().GetSize()),
        origin=tuple(float(v) for v in itk_image.GetOrigin()),
        spacing=tuple(float(v) for v in itk_image.GetSpacing()),
        direction=tuple(direction),
    )


def _apply_geometry(itk_image, geometry: Geometry) -> None:
    itk = _itk()
    itk_image.SetOrigin([float(v) for v in geometry.origin])
    itk_image.SetSpacing([float(v) for v in geometry.spacing])
    itk_image.SetDirection(itk.matrix_from_array(geometry.direction_matrix.copy()))


def _check_header(path: Path):
    """The ITK ImageIO of a readable 3-D scalar image file (header checks only)."""
    itk = _itk()
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    _check_suffix(path)
    try:
        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise RuntimeError("no ITK reader for this file")
        io.SetFileName(str(path))
        io.ReadImageInformation()
        ndim = io.GetNumberOfDimensions()
        ncomp = io.GetNumberOfComponents()
    except Exception as exc:  # ITK raises RuntimeError with multi-line text
        raise CombiregError(f"{path}: cannot read image header ({_first_line(exc)})") from None
    sizes = [io.GetDimensions(a) for a in range(ndim)]
    effective = [s for s in sizes if s > 1]
    if ndim != 3 and not (ndim == 4 and sizes[3] == 1):
        raise CombiregError(f"{path}: expected a 3-D image, got {ndim}-D of size {sizes}")
    if ncomp != 1:
        raise CombiregError(f"{path}: expected a scalar image, got {ncomp} components per voxel")
    if len(effective) < 3 and ndim == 3:
        raise CombiregError(f"{path}: expected a 3-D volume, got size {sizes}")
    return io


def _check_finite(path: Path, array: np.ndarray) -> None:
    """Refuse NaN/Inf voxels: on ITK's array, and for NIfTI on the raw file (ITK zeroes them)."""
    bad = 0
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if not bad and _is_nifti(path):
        bad = nifti_nonfinite_count(path)
    if bad:
        raise CombiregError(f"{path}: contains {bad} NaN/Inf voxels")


def read_image(path: str | os.PathLike) -> Image:
    """Read one 3-D scalar image as float32, geometry included.

    Raises
    ------
    CombiregError
        Missing or unreadable file, unsupported format, not 3-D, not scalar, or non-finite
        voxels (NaN/Inf, in any format).
    """
    itk = _itk()
    path = Path(path)
    _check_header(path)
    itk_image = _imread(path, itk.F)
    if itk_image.GetImageDimension() != 3:
        raise CombiregError(f"{path}: expected a 3-D image")
    array = np.asarray(itk.array_view_from_image(itk_image), dtype=np.float32).copy()
    _check_finite(path, array)
    return Image(torch.from_numpy(array)[None], geometry_from_itk(itk_image))


def read_array(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read one 3-D scalar image in the pixel type of the file (a label map keeps its integers).

    Returns
    -------
    array : ndarray, (Z, Y, X)
        The voxels in the file's own type where ITK's Python wrapping has it (uint8, int16,
        uint16, int32, uint32, float32, float64; other types come as ITK converts them).
    geometry : Geometry

    Raises
    ------
    CombiregError
        As :func:`read_image`.
    """
    itk = _itk()
    path = Path(path)
    _check_header(path)
    itk_image = _imread(path)
    if itk_image.GetImageDimension() != 3 or itk_image.GetNumberOfComponentsPerPixel() != 1:
        raise CombiregError(f"{path}: expected a 3-D scalar image")
    array = np.asarray(itk.array_view_from_image(itk_image)).copy()
    _check_finite(path, array)
    return array, geometry_from_itk(itk_image)


# ---------------------------------------------------------------------------------- NIfTI raw data
#: NIfTI datatype codes of floating-point voxels: code -> numpy type of one component.
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}  # float32, float64, complex64, complex128


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _open_raw(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def nifti_nonfinite_count(path: str | os.PathLike) -> int:
    """Number of NaN/Inf components in a NIfTI-1 or NIfTI-2 file's voxel block, read with numpy.

    Why: ITK 5.4's NIfTI reader replaces every non-finite float with 0 before anyone sees it
    (``nifti_read_buffer``), so a NaN image would pass as a valid one. Integer datatypes cannot
    hold NaN: 0 without reading the data. The block is streamed in chunks (bounded memory).

    Raises
    ------
    CombiregError
        A header that is neither NIfTI-1 nor NIfTI-2, or a voxel block shorter than the header says.
    """
    path = Path(path)
    try:
        with _open_raw(path) as fh:
            head = fh.read(540)
            layout = _nifti_layout(head, path)
            if layout is None:
                return 0
            offset, count, dtype = layout
            fh.seek(offset)
            bad, left, chunk = 0, count, max(1, (16 << 20) // dtype.itemsize)
            while left:
                want = min(left, chunk)
                data = fh.read(want * dtype.itemsize)
                if len(data) < want * dtype.itemsize:
                    raise CombiregError(f"{path}: the NIfTI voxel data are shorter than the header says")
                values = np.frombuffer(data, dtype=dtype)
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                left -= want
    except (OSError, EOFError) as exc:
        raise CombiregError(f"{path}: cannot read image ({_first_line(exc)})") from None
    return bad


def _nifti_layout(head: bytes, path: Path) -> tuple[int, int, np.dtype] | None:
    """(voxel-data offset, float components, component dtype) of a NIfTI header; None when the
    datatype is not floating point."""
    for order in ("<", ">"):
        if len(head) >= 348 and int(np.frombuffer(head[:4], order + "i4")[0]) == 348:
            datatype = int(np.frombuffer(head[70:72], order + "i2")[0])
            dims = np.frombuffer(head[40:56], order + "i2").astype(np.int64)
            offset = int(np.frombuffer(head[108:112], order + "f4")[0])
            break
        if len(head) >= 540 and int(np.frombuffer(head[:4], order + "i4")[0]) == 540:
            datatype = int(np.frombuffer(head[12:14], order + "i2")[0])
            dims = np.frombuffer(head[16:80], order + "i8")
            offset = int(np.frombuffer(head[168:176], order + "i8")[0])
            break
    else:
        raise CombiregError(f"{path}: not a NIfTI-1 or NIfTI-2 header")
    if datatype not in _NIFTI_FLOATS:
        return None
    ndim = int(min(max(dims[0], 1), 7))
    count = int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]]))
    if datatype in (32, 1792):
        count *= 2  # complex: two float components per voxel
    return max(offset, 348), count, np.dtype(order + _NIFTI_FLOATS[datatype])


def read_channels(paths: Sequence[str | os.PathLike], *, role: str = "image") -> Image:
    """Read several single-channel files of one subject into one multi-channel image.

    All channels must share one grid (size, origin, spacing, direction).
    """
    if len(paths) == 0:
        raise CombiregError(f"{role}: no image file given")
    images = [read_image(p) for p in paths]
    first = images[0]
    for path, img in zip(paths[1:], images[1:]):
        if not img.geometry.same_grid(first.geometry):
            raise CombiregError(
                f"{role}: channel {path} lies on another grid than {paths[0]} "
                f"(size {img.geometry.size} vs {first.geometry.size}); channels of one side must share a grid"
            )
    return Image(torch.cat([img.data for img in images], dim=0), first.geometry)


def _writer(path: Path, itk_image, compression_level: int | None = None) -> None:
    itk = _itk()
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        _write_nii_gz(path, itk_image, 6 if compression_level is None else int(compression_level))
        return
    writer = itk.ImageFileWriter[type(itk_image)].New()
    writer.SetFileName(str(path))
    writer.SetInput(itk_image)
    writer.SetUseCompression(name.endswith((".mha", ".nrrd")))
    writer.Update()


def _write_nii_gz(path: Path, itk_image, level: int) -> None:
    """ITK writes the NIfTI uncompressed, Python's zlib gzips it at ``level``.

    Why: ITK's NIfTI writer ignores the compression level and deflates at ~30 MB/s; a 1 mm
    float displacement field (100 MB of mantissa noise) took 3 s to shrink by 10%. With zlib
    here, fields are stored at level 0 (a valid gzip stream, 15x faster) and images at level 1,
    and zlib releases the GIL, so several files compress in parallel threads.
    """
    itk = _itk()
    raw = path.with_name(f".{path.name[:-3]}.{os.getpid()}-{threading.get_ident()}.tmp.nii")
    try:
        writer = itk.ImageFileWriter[type(itk_image)].New()
        writer.SetFileName(str(raw))
        writer.SetInput(itk_image)
        writer.SetUseCompression(False)
        writer.Update()
        with open(raw, "rb") as src, gzip.GzipFile(path, "wb", compresslevel=level, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    finally:
        raw.unlink(missing_ok=True)


def write_image(path: str | os.PathLike, image: Image | np.ndarray, geometry: Geometry | None = None,
                *, dtype=np.float32, compression_level: int | None = 1) -> None:
    """Write a single-channel image (Image or ``(Z, Y, X)`` array plus geometry).

    ``dtype`` is the voxel type on disk (float32 by default; integer types are rounded and
    clipped to their range).
    """
    itk = _itk()
    if isinstance(image, Image):
        if image.num_channels != 1:
            raise ValueError("write_image writes one channel; select it with Image.channel(k)")
        geometry = image.geometry
        array = image.numpy()[0]
    else:
        if geometry is None:
            raise ValueError("geometry is required when writing a plain array")
        array = np.asarray(image)
    array = np.asarray(array, dtype=np.float64 if np.issubdtype(dtype, np.integer) else np.float32)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry {geometry.shape}")
    itk_image = itk.image_from_array(array)
    _apply_geometry(itk_image, geometry)
    _writer(Path(path), itk_image, compression_level)


def write_displacement(path: str | os.PathLike, displacement_lps_mm: np.ndarray, geometry: Geometry,
                       *, compression_level: int | None = 0) -> None:
    """Write a displacement field as an ITK vector image (3 float32 components, LPS mm).

    Parameters
    ----------
    displacement_lps_mm : ndarray, (Z, Y, X, 3)
        Displacement at each voxel of ``geometry``, world (LPS) components in mm.
    """
    itk = _itk()
    array = np.ascontiguousarray(displacement_lps_mm, dtype=np.float32)
    if array.shape != geometry.shape + (3,):
        raise ValueError(f"field shape {array.shape} does not match {geometry.shape + (3,)}")
    itk_image = itk.image_from_array(array, is_vector=True)
    _apply_geometry(itk_image, geometry)
    _writer(Path(path), itk_image, compression_level)


def read_displacement(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a displacement field written in our convention.

    Returns
    -------
    displacement_lps_mm : ndarray, (Z, Y, X, 3)
    geometry : Geometry
    """
    itk = _itk()
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    itk_image = _imread(path, what="field")
    if itk_image.GetImageDimension() != 3 or itk_image.GetNumberOfComponentsPerPixel() != 3:
        raise CombiregError(f"{path}: not a 3-D displacement field with 3 components per voxel")
    array = np.asarray(itk.array_view_from_image(itk_image), dtype=np.float32).copy()
    return array, geometry_from_itk(itk_image)


def _imread(path: Path, pixel_type=None, *, what: str = "image"):
    """``itk.imread`` (in ``pixel_type``, else the file's), its errors as one CombiregError line."""
    itk = _itk()
    try:
        return itk.imread(str(path), pixel_type) if pixel_type is not None else itk.imread(str(path))
    except Exception as exc:
        raise CombiregError(f"{path}: cannot read {what} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # ITK messages put the useful part last ("Description: ...").
    for line in reversed(text):
        if "Description" in line or "rror" in line:
            return line.strip()
    return text[-1].strip() if text else type(exc).__name__
