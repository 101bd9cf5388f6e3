"""Exact coding of 80x80 patches: the integer flow, model files and their registry, the entropy
model (push and pop), the per-patch byte format, and the batch API.

Everything here is integer arithmetic, bit-exact on every machine; it never imports the float
training models (``wsi_idf.model``). The batch API is imported on first use: ``patch_format`` and
the registry's table need no torch.
"""

__all__ = ["encode_patches", "decode_patches", "ideal_bits"]


def __getattr__(name: str):
    if name in __all__:
        from . import batch
        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
