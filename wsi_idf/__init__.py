"""wsi-idf: lossless whole-slide image archiving with Integer Discrete Flows.

Importing it changes nothing in the process: coding's defaults (``coding.runtime``) apply when
coding is first used, and zarr's decode batch when an array with the ``wsi_idf`` codec is opened."""
from .archive import Archive, open_archive
from .errors import (ArchiveError, CorruptPatchError, InvalidPatchError, SlideError, UnknownModelError,
                     WeightsMismatchError, WsiIdfError)

from ._version import __version__

__all__ = ["open_archive", "Archive", "pack_slide", "encode_patches", "decode_patches", "ideal_bits", "get_model", "MODELS", "DEFAULT_MODEL",
           "WsiIdf", "WsiIdfCodec",
           "WsiIdfError", "ArchiveError", "SlideError", "CorruptPatchError", "InvalidPatchError", "UnknownModelError", "WeightsMismatchError",
           "__version__"]


def pack_slide(*args, **kwargs):  # imported lazily: it brings in Dask
    """Pack a slide into an archive; see :func:`wsi_idf.jobs.pack.pack_slide`."""
    from .jobs.pack import pack_slide as _pack_slide
    return _pack_slide(*args, **kwargs)


def __getattr__(name: str):  # imported on first use: torch (the batch API) or zarr's codec machinery
    if name in ("DEFAULT_MODEL", "MODELS", "get_model"):
        from .coding import registry
        return getattr(registry, name)
    if name in ("encode_patches", "decode_patches", "ideal_bits"):
        from . import coding
        return getattr(coding, name)
    if name == "WsiIdf":
        from .storage.numcodecs_codec import WsiIdf
        return WsiIdf
    if name == "WsiIdfCodec":
        from .storage.zarr_codec import WsiIdfCodec
        return WsiIdfCodec
    raise AttributeError(f"module 'wsi_idf' has no attribute {name!r}")
