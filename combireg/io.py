"""All file-format code: scalar images and displacement fields, through ITK.

ITK is imported lazily so that the rest of the library (and its tests) start fast.
Displacement fields are written as ITK vector images with three float32 components on the
grid they are defined on, in LPS millimetres (the elastix/ITK/ANTs convention).
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
    "read_channels",
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


def read_image(path: str | os.PathLike) -> Image:
    """Read one 3-D scalar image as float32, geometry included.

    Raises
    ------
    CombiregError
        Missing or unreadable file, unsupported format, not 3-D, not scalar, or non-finite
        voxels.
    """
    itk = _itk()
    path = Path(path)
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
    try:
        itk_image = itk.imread(str(path), itk.F)
    except Exception as exc:
        raise CombiregError(f"{path}: cannot read image ({_first_line(exc)})") from None
    if itk_image.GetImageDimension() != 3:
        raise CombiregError(f"{path}: expected a 3-D image")
    array = np.asarray(itk.array_view_from_image(itk_image), dtype=np.float32).copy()
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise CombiregError(f"{path}: contains {bad} NaN/Inf voxels")
    return Image(torch.from_numpy(array)[None], geometry_from_itk(itk_image))


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
    try:
        itk_image = itk.imread(str(path))
    except Exception as exc:
        raise CombiregError(f"{path}: cannot read field ({_first_line(exc)})") from None
    if itk_image.GetImageDimension() != 3 or itk_image.GetNumberOfComponentsPerPixel() != 3:
        raise CombiregError(f"{path}: not a 3-D displacement field with 3 components per voxel")
    array = np.asarray(itk.array_view_from_image(itk_image), dtype=np.float32).copy()
    return array, geometry_from_itk(itk_image)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # ITK messages put the useful part last ("Description: ...").
    for line in reversed(text):
        if "Description" in line or "rror" in line:
            return line.strip()
    return text[-1].strip() if text else type(exc).__name__
