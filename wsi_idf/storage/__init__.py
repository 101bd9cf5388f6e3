"""Where coded patches live in Zarr: the numcodecs and Zarr v3 codecs, the shard index, the two
Zarr format objects, and a slide's own compressed tiles kept as they are."""
