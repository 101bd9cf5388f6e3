"""DICOM WSI (VL Whole Slide Microscopy Image) files through pydicom: frames read and decoded directly.

One file is one pyramid level: a TILED_FULL grid of frames (one focal plane, one optical path);
a folder of one series' files is a pyramid (``DicomSlide``).
JPEG baseline and JPEG 2000 frames are lossy-at-scan tiles that the archive keeps as they are
(``--codec auto``, as SVS tiles; each frame's bytes come back for ``wsi-idf restore``); JPEG-LS and
uncompressed frames, and RLE Lossless frames, are decoded and coded with the IDF. JPEG frames decode with libjpeg-turbo's
own colour-space choice (imagecodecs, as OpenSlide 4 does: equal on the real Camelyon file).
TILED_SPARSE files, concatenations, several focal planes or optical paths are refused with one line.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .errors import SlideError
from .slide_base import Level, Slide, SlideInfo, SourceSegments, check_rgb8

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit and explicit VR little endian
KEPT = {"1.2.840.10008.1.2.4.50": "jpeg", "1.2.840.10008.1.2.4.91": "jpeg2000", "1.2.840.10008.1.2.4.90": "jpeg2000"}
DECODED = {"1.2.840.10008.1.2.4.80": "jpegls", "1.2.840.10008.1.2.4.81": "jpegls", "1.2.840.10008.1.2.5": "rle"}
ITEM, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
# the attributes an archive records (no patient identifiers): what the slide is and how it was imaged
RECORDED = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "ContainerIdentifier", "ImageType", "ImagedVolumeWidth", "ImagedVolumeHeight",
            "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows", "Columns", "NumberOfFrames",
            "PhotometricInterpretation", "DimensionOrganizationType", "LossyImageCompression",
            "LossyImageCompressionRatio", "LossyImageCompressionMethod")


class DicomInstance:
    """One DICOM WSI file (instance): a TILED_FULL grid of frames, read and decoded directly."""

    def __init__(self, path: Path):
        self.path = path
        with warnings.catch_warnings():  # pydicom warns of over-long UIDs and the like: not our reader's concern
            warnings.simplefilter("ignore")
            self._open(path)

    def _open(self, path: Path) -> None:
        import pydicom
        try:
            ds = pydicom.dcmread(path, defer_size=1024)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            sop = str(ds.SOPClassUID)
            rows, cols = int(ds.Rows), int(ds.Columns)
            height, width = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
            frames = int(ds.get("NumberOfFrames", 1))
            pixel_start = ds["PixelData"].file_tell
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise SlideError(f"{path.name}: cannot be read as a DICOM WSI file; it may be truncated or damaged "
                             f"({type(exc).__name__}: {str(exc)[:120]})") from None
        name = path.name
        if sop != WSI_SOP_CLASS:
            raise SlideError(f"{name}: a DICOM file, but not a VL Whole Slide Microscopy image (SOP class {sop})")
        if "ConcatenationUID" in ds:
            raise SlideError(f"{name}: one part of a DICOM concatenation (an image split over several files), "
                             "which wsi-idf does not join; convert it to a single-file pyramid")
        organization = ds.get("DimensionOrganizationType")
        self.across, down = -(-width // cols), -(-height // rows)
        if organization == "TILED_SPARSE" or organization is None and (
                frames != self.across * down or "PerFrameFunctionalGroupsSequence" in ds):
            raise SlideError(f"{name}: TILED_SPARSE frames (each placed by its own position) are not supported; "
                             "only TILED_FULL DICOM WSI files are")
        if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1 or int(ds.get("NumberOfOpticalPaths", 1)) != 1:
            raise SlideError(f"{name}: several focal planes or optical paths; wsi-idf archives one RGB plane")
        if frames != self.across * down:
            raise SlideError(f"{name}: {frames} frames do not fill the {self.across}x{down} tile grid")
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        check_rgb8(name, np.dtype(f"u{max(1, bits // 8)}"), (height, width, samples), "YXS")
        if syntax in NATIVE:
            if int(ds.get("PlanarConfiguration", 0)) != 0 or ds.PhotometricInterpretation != "RGB":
                raise SlideError(f"{name}: uncompressed frames that are not interleaved RGB are not supported")
            size = rows * cols * 3
            self.frames = [(pixel_start + i * size, size) for i in range(frames)]
            self.coding = "native"
        elif syntax in KEPT or syntax in DECODED:
            self.frames = encapsulated_frames(path, pixel_start, frames, trim_jpeg=syntax in KEPT)
            self.coding = KEPT.get(syntax) or DECODED[syntax]
        else:
            raise SlideError(f"{name}: DICOM transfer syntax {syntax} ({getattr(ds.file_meta.TransferSyntaxUID, 'name', '')}) "
                             "is not supported; JPEG, JPEG 2000, JPEG-LS, RLE and uncompressed frames are")
        file_size = path.stat().st_size
        if any(offset + length > file_size for offset, length in self.frames):
            raise SlideError(f"{name}: truncated file: frame data runs past its end")
        self.tile = (rows, cols)
        self.width, self.height = width, height
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        self.flavor = image_type[2] if len(image_type) > 2 else "VOLUME"
        self.series = str(ds.get("SeriesInstanceUID", ""))
        self.info = dicom_info(ds, syntax, self.coding)
        self._handle = open(path, "rb")
        self._cache: dict[int, np.ndarray] = {}

    def source_segments(self) -> SourceSegments | None:
        from .storage.source_tiles import MAX_TILE, TileCoding
        rows, cols = self.tile
        if self.coding not in ("jpeg", "jpeg2000") or rows != cols or not 16 <= rows <= MAX_TILE:
            return None
        return SourceSegments(TileCoding(self.coding, None, None, None), rows, cols, self.across, len(self.frames))

    def segment_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(self.frames, dtype=np.int64).reshape(-1, 2)
        return frames[:, 0], frames[:, 1]

    def read_segments(self, indices: list[int]) -> list[bytes]:
        out = []
        for i in indices:
            offset, length = self.frames[i]
            out.append(os_pread(self._handle, offset, length))
        return out

    def _frame(self, index: int) -> np.ndarray:
        import imagecodecs
        if index not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            data = self.read_segments([index])[0]
            rows, cols = self.tile
            if self.coding == "native":
                pixels = np.frombuffer(data, np.uint8)
            elif self.coding == "jpeg":
                pixels = imagecodecs.jpeg_decode(data)
            elif self.coding == "jpeg2000":
                pixels = imagecodecs.jpeg2k_decode(data)
            elif self.coding == "rle":  # DICOM RLE Lossless: one segment per sample, planes in turn
                from pydicom.pixels.decoders.rle import _rle_decode_frame
                planes = np.frombuffer(_rle_decode_frame(data, rows, cols, 3, 8), np.uint8)
                pixels = planes.reshape(3, rows, cols).transpose(1, 2, 0)
            else:
                pixels = imagecodecs.jpegls_decode(data)
            self._cache[index] = np.asarray(pixels).reshape(rows, cols, 3)
        return self._cache[index]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        rows, cols = self.tile
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for r in range(y0 // rows, (y1 - 1) // rows + 1):
            for c in range(x0 // cols, (x1 - 1) // cols + 1):
                frame = self._frame(r * self.across + c)
                ty0, tx0 = r * rows, c * cols
                ya, yb = max(y0, ty0), min(y1, ty0 + rows)
                xa, xb = max(x0, tx0), min(x1, tx0 + cols)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = frame[ya - ty0:yb - ty0, xa - tx0:xb - tx0]
        return out

    def close(self) -> None:
        self._handle.close()


ASSOCIATED_FLAVORS = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}


class DicomSlide(Slide):
    """A DICOM WSI file, or a folder holding one series' instances: each VOLUME instance a pyramid
    level (largest first), LABEL, OVERVIEW and THUMBNAIL instances its associated images."""

    backend = "dicom"

    def __init__(self, path: Path):
        super().__init__(path)
        if path.is_dir():
            candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))
            if not candidates:
                raise SlideError(f"{path}: a folder without DICOM files (MRXS: give the .mrxs file beside its folder)")
        else:
            candidates = [path]
        self.instances: list[DicomInstance] = []
        try:
            for candidate in candidates:
                self.instances.append(DicomInstance(candidate))
        except SlideError:
            self.close()
            raise
        if len({i.series for i in self.instances}) > 1:
            self.close()
            raise SlideError(f"{path.name}: DICOM files of several series; give one series' folder")
        volumes = sorted((i for i in self.instances if i.flavor not in ASSOCIATED_FLAVORS),
                         key=lambda i: (-i.width, -i.height, i.path.name))
        sizes = [(v.width, v.height) for v in volumes]
        if len(set(sizes)) != len(sizes):
            self.close()
            raise SlideError(f"{path.name}: two VOLUME instances of the same size (a second focal plane, optical "
                             "path or a duplicate file); wsi-idf archives one plane per level")
        if not volumes:  # a single file of another flavor is read as the image it is
            volumes = self.instances[:1]
        self.volumes = volumes
        self.extras = {ASSOCIATED_FLAVORS[i.flavor]: i for i in self.instances
                       if i not in volumes and i.flavor in ASSOCIATED_FLAVORS}
        base = volumes[0]
        for v in volumes:
            self.levels.append(Level(v.width, v.height, (base.width / v.width + base.height / v.height) / 2))
        self.info = base.info
        self.files = [i.path for i in self.instances]

    def _instance(self, level: int | str) -> DicomInstance:
        return self.extras[level] if isinstance(level, str) else self.volumes[level]

    def segment_file(self, level: int | str) -> int:
        return self.files.index(self._instance(level).path)

    def source_segments(self, level: int | str) -> SourceSegments | None:
        return self._instance(level).source_segments() if isinstance(level, int) else None

    def segment_offsets(self, level: int | str) -> tuple[np.ndarray, np.ndarray]:
        return self._instance(level).segment_offsets()

    def read_segments(self, level: int | str, indices: list[int]) -> list[bytes]:
        return self._instance(level).read_segments(indices)

    def _read(self, level, y0, y1, x0, x1):
        return self.volumes[level].read(y0, y1, x0, x1)

    def associated_names(self) -> list[str]:
        return sorted(self.extras)

    def associated(self, name: str) -> np.ndarray:
        instance = self.extras[name]
        return instance.read(0, instance.height, 0, instance.width)

    def close(self) -> None:
        for instance in getattr(self, "instances", []):
            instance.close()


def is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def os_pread(handle, offset: int, length: int) -> bytes:
    import os
    return os.pread(handle.fileno(), length, offset)


def encapsulated_frames(path: Path, start: int, frames: int, trim_jpeg: bool) -> list[tuple[int, int]]:
    """(offset, length) of each frame's single fragment after the basic offset table; a JPEG frame's
    trailing padding after EOI is left out (it stays in the file's skeleton for restore)."""
    out = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos, first = start, True
        while True:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise SlideError(f"{path.name}: truncated file: the frames end before their sequence does")
            tag = int.from_bytes(head[:2], "little"), int.from_bytes(head[2:4], "little")
            length = int.from_bytes(head[4:], "little")
            pos += 8
            if tag == SEQUENCE_END:
                break
            if tag != ITEM or pos + length > size:
                raise SlideError(f"{path.name}: damaged or truncated pixel data (item at byte {pos - 8})")
            if not first:
                kept = length
                if trim_jpeg and length >= 2:
                    f.seek(pos + length - min(length, 16))
                    tail = f.read(min(length, 16))
                    end = tail.rfind(b"\xff\xd9")
                    kept = length - len(tail) + end + 2 if end >= 0 else length
                out.append((pos, kept))
            first = False
            pos += length
            if len(out) > frames:
                break
    if len(out) != frames:
        raise SlideError(f"{path.name}: {len(out)} frame fragments for {frames} frames; frames split over several "
                         "fragments, or a damaged file, are not supported")
    return out


def dicom_info(ds, syntax: str, coding: str) -> SlideInfo:
    import pydicom
    props = {f"dicom.{key}": str(ds.get(key)) for key in RECORDED if key in ds}
    spacing = None
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError, KeyError):
        pass
    mpp = (float(spacing[1]) * 1000, float(spacing[0]) * 1000) if spacing else None  # (row, column) spacing in mm
    objective, icc = None, None
    if "OpticalPathSequence" in ds and len(ds.OpticalPathSequence):
        path = ds.OpticalPathSequence[0]
        if "ObjectiveLensPower" in path:
            objective = float(path.ObjectiveLensPower)
        if "ICCProfile" in path:
            icc = bytes(path.ICCProfile)
        for key in ("OpticalPathIdentifier", "OpticalPathDescription"):
            if key in path:
                props[f"dicom.OpticalPath.{key}"] = str(path.get(key))
    if "ICCProfile" in ds:
        icc = bytes(ds.ICCProfile)
    if "SpecimenDescriptionSequence" in ds and len(ds.SpecimenDescriptionSequence):
        specimen = ds.SpecimenDescriptionSequence[0]
        for key in ("SpecimenIdentifier", "SpecimenUID", "SpecimenShortDescription"):
            if key in specimen:
                props[f"dicom.Specimen.{key}"] = str(specimen.get(key))
    if mpp:
        props["openslide.mpp-x"], props["openslide.mpp-y"] = str(mpp[0]), str(mpp[1])
    compression = {"jpeg": "JPEG", "jpeg2000": "JPEG2000", "jpegls": "JPEGLS", "rle": "RLE", "native": "NONE"}[coding]
    decoder = {"reader": f"pydicom {pydicom.__version__}", "transfer_syntax": syntax, "compression": compression}
    import imagecodecs
    version = {"jpeg": "jpeg8", "jpeg2000": "jpeg2k", "jpegls": "jpegls"}.get(coding)
    if version and hasattr(imagecodecs, f"{version}_version"):
        decoder["pixel_decoder"] = getattr(imagecodecs, f"{version}_version")()
    return SlideInfo(vendor="dicom", properties=props, mpp=mpp, objective_power=objective, icc_profile=icc,
                     background=(255, 255, 255), decoder=decoder)
