"""NIfTI reading and writing: the only place that knows SimpleITK's axis order.

Inside unet-train every volume is a numpy array in (x, y, z) or (x, y, z, c) order,
like nibabel and the datasets' documentation (240 x 240 x 155). SimpleITK's arrays are
(z, y, x) / (c, z, y, x); we transpose here and nowhere else. Every failure becomes a
``DataError`` that names the file.
"""
from __future__ import annotations

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
                head = _gzip_head(path, raw, 540)
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
            magic = head[344:347] if sizeof_hdr == 348 else head[4:7] if sizeof_hdr == 540 else b""
            if magic in (b"n+1", b"n+2"):
                return head
            if magic in (b"ni1", b"ni2"):
                # a header whose data lives in a separate .img: in a .nii it skipped every size,
                # truncation and NaN check (seen: a 348-byte header read as a 48 x 48 x 32 volume)
                raise DataError(f"{path}: header says '{magic.decode()}' (data in a separate .img file); a "
                                f".nii/.nii.gz must hold its data ('n+{magic.decode()[-1]}'): convert the "
                                f"pair to a single .nii.gz")
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
    # a byte budget too: voxels wider than 4 bytes (float64, complex) count as several
    weight = max(int(header.bitpix), 32) / 32
    if voxels * weight > max_voxels:
        raise DataError(f"{path}: header claims {' x '.join(map(str, shape))} voxels of {header.bitpix} bits = "
                        f"{voxels * header.bitpix // 8:,} bytes, more than data.max_voxels = {max_voxels:,} "
                        f"4-byte voxels; refusing to read it (raise data.max_voxels if the volume is real)")


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
    if float_dtype is None and not gzipped:
        if os.path.getsize(path) < offset + nbytes:
            raise DataError(f"{path}: truncated NIfTI ({os.path.getsize(path)} bytes, header "
                            f"needs {offset + nbytes})")
        return
    # gzip is always decompressed and counted: its trailer holds the size only mod 2**32, so a
    # block followed by 2**32 k bytes of zeros matched it
    dtype = np.dtype(endian + float_dtype) if float_dtype else None
    done = bad = skip = 0
    carry = b""
    try:
        # to the end, so that zlib checks every member's CRC and length, but never past the first
        # byte beyond the header's size: 8 MB of gzip can unpack to 8 GiB of zeros after a valid block
        for chunk in (_gzip_chunks(path, offset + nbytes) if gzipped else _plain_chunks(path, offset, nbytes)):
            if gzipped and skip < offset:
                cut = min(offset - skip, len(chunk))
                skip, chunk = skip + cut, chunk[cut:]
                if not chunk:
                    continue
            if done + len(chunk) > nbytes:
                if gzipped:
                    raise DataError(f"{path}: compressed data continues past the {offset + nbytes:,} bytes "
                                    f"the header describes; refusing it (a truncated-header or padded file, "
                                    f"or a decompression bomb)")
                chunk = chunk[:nbytes - done]
            if dtype is not None:
                data = carry + chunk
                whole = len(data) - len(data) % dtype.itemsize
                bad += int((~np.isfinite(np.frombuffer(data[:whole], dtype))).sum())
                carry = data[whole:]
            done += len(chunk)
            if done >= nbytes and not gzipped:
                break
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read NIfTI (truncated or corrupt: {exc})") from None
    if done < nbytes:
        raise DataError(f"{path}: truncated NIfTI (data block has {done} of {nbytes} bytes)")
    if bad:
        raise DataError(f"{path}: {bad} NaN/Inf voxel(s); expected finite intensities")


# gzip, read by these rules before SimpleITK sees the file (it decompresses in C, with no limits):
# Python's gzip module reads a file-name field byte by byte and takes any number of members (seen:
# 1.5 M empty members in 37 MB, or a 20 MB file name, took 12-23 s); its trailer holds the size
# only mod 2**32 (seen: an int16 block + 8 GiB of zeros matched it).
GZIP_FIELD_LIMIT = 4096          # FNAME / FCOMMENT of the first member (real ones: a file name)
GZIP_MEMBERS_PER_MIB = 64        # bgzip writes a member per 64 KiB of data: 16 per MiB
GZIP_MEMBERS_MIN = 16
GZIP_OVERHEAD_PER_MIB = 1 << 14  # compressed bytes beyond the data: deflate's stored blocks add ~80 B/MiB


def _gzip_head(path: Path, raw, size: int) -> bytes:
    """The first ``size`` decompressed bytes of an open gzip file, its first header's fields capped."""
    start = raw.read(10 + 2 * (GZIP_FIELD_LIMIT + 1) + 2 + 65537)
    _check_gzip_fields(path, start)
    decompressor = zlib.decompressobj(31)
    try:
        head = decompressor.decompress(start, size)
        while len(head) < size and not decompressor.eof:
            more = raw.read(1 << 16)
            if not more:
                break
            head += decompressor.decompress(decompressor.unconsumed_tail + more, size - len(head))
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    return head


def _check_gzip_fields(path: Path, start: bytes) -> None:
    """RFC 1952 header of the first member: a file name or comment is a short zero-terminated field."""
    if len(start) < 10:
        raise DataError(f"{path}: corrupt gzip stream (a {len(start)}-byte header)")
    flags, at = start[3], 10
    if flags & 4:  # FEXTRA: its own 2-byte length, at most 64 KiB
        at += 2 + int.from_bytes(start[at:at + 2], "little")
    for bit, name in ((8, "file name"), (16, "comment")):
        if flags & bit:
            end = start.find(b"\0", at, at + GZIP_FIELD_LIMIT + 1)
            if end < 0:
                raise DataError(f"{path}: gzip {name} field longer than {GZIP_FIELD_LIMIT} bytes; refusing it")
            at = end + 1


def _gzip_chunks(path: Path, total: int):
    """Decompressed chunks of a gzip file, read (never taken from the trailer), member by member;
    DataError past ``total`` + 1 bytes, with more members or compressed padding than data can need."""
    mib = total / (1 << 20) + 1
    max_members = GZIP_MEMBERS_MIN + int(mib * GZIP_MEMBERS_PER_MIB)
    max_compressed = total + int(mib * GZIP_OVERHEAD_PER_MIB) + 2 * (GZIP_FIELD_LIMIT + 65536)
    members, done, compressed = 1, 0, 0
    decompressor = zlib.decompressobj(31)
    with open(path, "rb") as raw:
        pending = b""
        while True:
            if not pending:
                pending = raw.read(_CHUNK)
                compressed += len(pending)
                if compressed > max_compressed:
                    raise DataError(f"{path}: more than {max_compressed:,} compressed bytes for {total:,} bytes of "
                                    f"image; refusing the padding (empty gzip members, header fields or data "
                                    f"beyond the image)")
                if not pending:
                    if not decompressor.eof:
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                    return
            if decompressor.eof:  # the next member, or zero padding after the last one
                if not pending.strip(b"\0"):
                    pending = b""
                    continue
                members += 1
                if members > max_members:
                    raise DataError(f"{path}: more than {max_members:,} gzip members for {total:,} bytes of "
                                    f"image; refusing it")
                decompressor = zlib.decompressobj(31)
            chunk = decompressor.decompress(pending, _CHUNK)
            pending = decompressor.unconsumed_tail or decompressor.unused_data
            if decompressor.eof:
                pending = decompressor.unused_data
            if chunk:
                done += len(chunk)
                yield chunk
                if done > total:
                    return


def _plain_chunks(path: Path, offset: int, nbytes: int):
    with open(path, "rb") as handle:
        handle.seek(offset)
        done = 0
        while done < nbytes and (chunk := handle.read(min(_CHUNK, nbytes - done))):
            done += len(chunk)
            yield chunk


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
