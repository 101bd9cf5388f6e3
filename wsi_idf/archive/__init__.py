"""An archive: its OME-Zarr layout and metadata checks, the one checked read path, progressive
reads, and the ways out (unpack to OME-TIFF, one region, info)."""
from .layout import Archive, open_archive

__all__ = ["Archive", "open_archive"]
