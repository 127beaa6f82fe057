"""NIfTI reading and writing: the only place that knows SimpleITK's axis order.

Inside unet-train every volume is a numpy array in (x, y, z) or (x, y, z, c) order,
like nibabel and the datasets' documentation (240 x 240 x 155). SimpleITK's arrays are
(z, y, x) / (c, z, y, x); we transpose here and nowhere else. Every failure becomes a
``DataError`` that names the file.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from trainer.errors import DataError
from trainer.fsutil import atomic_file, open_regular

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D grid; copied verbatim onto predictions."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major

    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world (LPS) matrix, for comparing geometries."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


@dataclass(frozen=True)
class Volume:
    array: np.ndarray  # (x, y, z) or (x, y, z, c)
    geometry: Geometry
    path: Path


def is_nifti_name(name: str) -> bool:
    """NIfTI by name, excluding macOS AppleDouble companions (``._BRATS_001.nii.gz``)."""
    return not name.startswith("._") and name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_header(path: Path) -> bytes:
    """Fail fast, with a clear reason, on files that are not NIfTI-1/2 at all; returns the header bytes."""
    try:
        raw, _ = open_regular(path)
        with raw:
            magic = raw.read(2)
            raw.seek(0)
            if magic == b"\x1f\x8b":
                try:
                    head = gzip.GzipFile(fileobj=raw).read(540)
                except (OSError, EOFError, zlib.error) as exc:
                    raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
            else:
                if path.name.lower().endswith(".gz"):
                    raise DataError(f"{path}: named .gz but is not gzip-compressed")
                head = raw.read(540)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a NIfTI file") from None
    if len(head) >= 348:
        for endian in "<>":
            sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
            if sizeof_hdr == 348 and head[344:347] in (b"n+1", b"ni1"):
                return head
            if sizeof_hdr == 540 and head[4:7] in (b"n+2", b"ni2"):
                return head
    raise DataError(f"{path}: not a NIfTI file (no NIfTI-1/2 header; {len(head)} header bytes read)")


# data.max_voxels' default, for callers without settings (tests, notebooks).
DEFAULT_MAX_VOXELS = 2 ** 28


def read_volume(path: Path, dtype: np.dtype | type | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a 3D or 4D NIfTI; reject oversized, corrupt or truncated files and NaN/Inf voxels.

    The size comes from the header and is capped before anything is decompressed or allocated."""
    path = Path(path)
    head = check_header(path)
    _check_size(path, head, max_voxels)
    _check_data(path, head)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read NIfTI (truncated or corrupt: {_itk_reason(exc)})") from None
    array = sitk.GetArrayFromImage(image)
    # SimpleITK gives (z, y, x) / (c, z, y, x); reversing the axes gives (x, y, z[, c]).
    array = np.ascontiguousarray(np.transpose(array))
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{path}: {bad} NaN/Inf voxel(s); expected finite intensities")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(array=array, geometry=_geometry(image), path=path)


_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
_CHUNK = 1 << 24


@dataclass(frozen=True)
class _Header:
    """The fields of a NIfTI-1/2 header that size the data block."""

    endian: str
    dims: tuple[int, ...]  # dim[0..7]
    datatype: int
    bitpix: int
    offset: int            # vox_offset: where the data starts in a single-file (.nii) image
    single_file: bool      # n+1/n+2: data follows the header; ni1/ni2: it lives in a separate .img

    @property
    def shape(self) -> tuple[int, ...] | None:
        """(x, y, z, ...) or None when dim[0] is outside 1..7 (left to SimpleITK to judge)."""
        if not 1 <= self.dims[0] <= 7:
            return None
        return tuple(max(int(d), 1) for d in self.dims[1:self.dims[0] + 1])


def _parse_header(head: bytes) -> _Header | None:
    for endian in "<>":
        if struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1"):
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            offset = max(int(vox_offset) if np.isfinite(vox_offset) else 0, 352)
            return _Header(endian, dims, datatype, bitpix, offset, head[344:347] == b"n+1")
        if struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2"):
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(int(struct.unpack(endian + "q", head[168:176])[0]), 544)
            return _Header(endian, dims, datatype, bitpix, offset, head[4:7] == b"n+2")
    return None


def _check_size(path: Path, head: bytes, max_voxels: int) -> None:
    """Refuse a volume larger than ``max_voxels`` from its header alone: a few bytes of gzip can
    claim gigabytes, and SimpleITK would allocate them all before noticing the data is missing."""
    header = _parse_header(head)
    shape = header.shape if header else None
    if shape is None:
        return
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise DataError(f"{path}: header claims {' x '.join(map(str, shape))} = {voxels:,} voxels, more than "
                        f"data.max_voxels = {max_voxels:,}; refusing to read it (raise data.max_voxels if "
                        f"the volume is real)")


def _check_data(path: Path, head: bytes) -> None:
    """Reject a truncated data block and NaN/Inf floats on the raw bytes.

    SimpleITK's NIfTI reader (niftilib) silently zero-fills a short or cut-off data block and
    replaces NaN/Inf voxels by 0, so neither can be detected in the array it returns.
    """
    header = _parse_header(head)
    if header is None or not header.single_file:
        return  # header/image pair (ni1/ni2): the data is not in this file
    shape, datatype, bitpix, offset, endian = header.shape, header.datatype, header.bitpix, header.offset, header.endian
    if shape is None or bitpix <= 0:
        return  # leave odd headers to SimpleITK
    nbytes = (math.prod(shape) * bitpix + 7) // 8
    float_dtype = _FLOAT_TYPES.get(datatype)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if float_dtype is None:
        if not gzipped:
            if os.path.getsize(path) < offset + nbytes:
                raise DataError(f"{path}: truncated NIfTI ({os.path.getsize(path)} bytes, header "
                                f"needs {offset + nbytes})")
            return
        # gzip trailer: the uncompressed size mod 2**32. A cheap check only while that is the
        # size itself; beyond 4 GiB a forged trailer could match, so decompress and count.
        if offset + nbytes < 2 ** 32:
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                if struct.unpack("<I", raw.read(4))[0] == offset + nbytes:
                    return
    dtype = np.dtype(endian + float_dtype) if float_dtype else None
    done = bad = 0
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
            handle.seek(offset)
            # to the end, so gzip checks its CRC and length, but never past the first byte beyond the
            # header's size: 8 MB of gzip can unpack to 8 GiB of zeros after a valid block
            while chunk := handle.read(min(_CHUNK, nbytes - done + 1)):
                if done + len(chunk) > nbytes:
                    if gzipped:
                        raise DataError(f"{path}: compressed data continues past the {offset + nbytes:,} bytes "
                                        f"the header describes; refusing it (a truncated-header or padded file, "
                                        f"or a decompression bomb)")
                    break
                if dtype is not None:
                    data = chunk[:len(chunk) - len(chunk) % dtype.itemsize]
                    bad += int((~np.isfinite(np.frombuffer(data, dtype))).sum())
                done += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read NIfTI (truncated or corrupt: {exc})") from None
    if done < nbytes:
        raise DataError(f"{path}: truncated NIfTI (data block has {done} of {nbytes} bytes)")
    if bad:
        raise DataError(f"{path}: {bad} NaN/Inf voxel(s); expected finite intensities")


def read_shape(path: Path) -> tuple[int, ...]:
    """Shape in (x, y, z[, c]) order from the header only (cheap pre-flight check)."""
    return read_header(path)[0]


def read_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) in (x, y, z[, c]) order from the header only."""
    path = Path(path)
    check_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read NIfTI header ({_itk_reason(exc)})") from None
    return tuple(int(n) for n in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing())


def write_volume(path: Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Write (x, y, z) or (x, y, z, c) atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)), isVector=False)
    dims = image.GetDimension()
    spacing = list(geometry.spacing) + [1.0] * (dims - 3)
    origin = list(geometry.origin) + [0.0] * (dims - 3)
    direction = np.eye(dims)
    direction[:3, :3] = np.asarray(geometry.direction).reshape(3, 3)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.flatten().tolist())
    with atomic_file(path) as tmp:  # the temp name keeps .nii(.gz), so SimpleITK picks NIfTI
        sitk.WriteImage(image, str(tmp), useCompression=compress and path.name.lower().endswith(".gz"))


def identity_geometry(spacing: float = 1.0) -> Geometry:
    return Geometry(spacing=(spacing,) * 3, origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _geometry(image: sitk.Image) -> Geometry:
    dims = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dims, dims)[:3, :3]
    return Geometry(spacing=tuple(float(s) for s in image.GetSpacing()[:3]),
                    origin=tuple(float(o) for o in image.GetOrigin()[:3]),
                    direction=tuple(float(d) for d in direction.flatten()))


def _itk_reason(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()[:200]
    return (lines[-1] if lines else "unknown error")[:200]
